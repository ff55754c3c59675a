"""Smoke test of tools/bench_pipeline.py on the bundled DemoNet (a few seconds)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "bench_pipeline.py")


@pytest.fixture(scope="module")
def bench_tool():
    spec = importlib.util.spec_from_file_location("bench_pipeline", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_stage_timed_and_the_check_passes(bench_tool):
    torch.manual_seed(0)
    result = bench_tool.bench("demo", runs=1)
    names = [s.name for s in bench_tool.PIPELINE]
    assert {"trace", "analyze", "allocate", "rewrite", "export", "check"} <= set(names)
    assert set(result.times) == set(names) == set(result.notes)
    for name in names:
        assert len(result.times[name]) == 1 and result.times[name][0] > 0, name
        assert result.notes[name], name
    assert result.notes["check"].startswith("ok: 10/10 layers fit"), result.notes["check"]
    assert result.notes["export"].startswith("torchscript, 10 annotated layers")
    assert "torchscript (dynamo=False)" in result.notes["plain export, same exporter"]
    default = "dynamo" if bench_tool.DEFAULT_DYNAMO else "torchscript"
    assert result.notes["plain torch.onnx.export"].startswith(f"torch defaults: {default}")
    in_total = [s.name for s in bench_tool.PIPELINE if s.in_total]
    assert in_total == ["trace", "analyze", "allocate", "rewrite", "export", "check"]
    assert result.total == [pytest.approx(sum(result.times[n][0] for n in in_total))]
    for ref in ("plain torch.onnx.export", "plain export, same exporter"):
        ratio = result.ratio(ref)
        assert math.isfinite(ratio) and ratio == pytest.approx(
            result.total[0] / result.times[ref][0])
    rows = result.rows()
    assert [r[1] for r in rows[:-1]] == names and rows[-1][1].startswith("vbxfx total")


def test_the_check_stage_fails_when_torch_and_onnx_differ(bench_tool, tmp_path):
    """The check stage is not a formality: a torch model that no longer matches its ONNX
    file (one output bias moved after the export) makes it raise."""
    torch.manual_seed(0)
    model, inputs = bench_tool.MODELS["demo"]()
    ctx = {"model": model, "inputs": inputs, "tmp": str(tmp_path),
           "options": {"compression": 0.66, "check_random": 0}}
    stages = {s.name: s for s in bench_tool.PIPELINE}
    for name in ("trace", "analyze", "allocate", "rewrite", "export"):
        stages[name].run(ctx)
    assert stages["check"].run(ctx).startswith("ok")
    with torch.no_grad():
        ctx["compressed"].fc.bias[3] += 1.0
    with pytest.raises(bench_tool.CheckFailed, match="differs from torch"):
        stages["check"].run(ctx)
