"""The onnx2tf converter for the tests that convert: found as vbxfx finds it, else the
repository's ``.venv-tflite``; skipped when missing, unless ``VBXFX_REQUIRE_TFLITE`` is set
(CI), which makes a missing converter a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vbxfx.errors import ExportError
from vbxfx.integrations.onnx2tf import find_onnx2tf

REPO_ENV = Path(__file__).resolve().parents[1] / ".venv-tflite" / "bin" / "onnx2tf"


def onnx2tf_or_skip() -> str:
    """The onnx2tf executable's path (see the module docstring)."""
    try:
        return find_onnx2tf()
    except ExportError as e:
        if REPO_ENV.is_file():
            return str(REPO_ENV)
        if os.environ.get("VBXFX_REQUIRE_TFLITE"):
            pytest.fail(f"VBXFX_REQUIRE_TFLITE is set and the converter is missing: {e}")
        pytest.skip("no onnx2tf environment (bash tools/setup_tflite_env.sh .venv-tflite)")
