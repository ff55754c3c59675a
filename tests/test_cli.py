"""The installed command line, driven in a subprocess as a new user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "vbxfx"
CMD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "vbxfx"]


def run(*args, cwd=None):
    return subprocess.run(CMD + list(args), cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "YOLO_OFFLINE": "1"})


def test_help_and_version():
    assert run("--help").returncode == 0
    out = run("--version")
    assert out.returncode == 0 and "vbxfx" in out.stdout


def test_python_dash_m_behaves_the_same():
    a = subprocess.run([sys.executable, "-m", "vbxfx", "analyze", "demo", "--json"],
                       capture_output=True, text=True, timeout=300)
    b = run("analyze", "demo", "--json")
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_analyze_json():
    out = run("analyze", "demo", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    names = [layer["name"] for layer in data["layers"]]
    assert "layer1.conv1" in names and "fc" in names


def test_compress_export_check_roundtrip(tmp_path):
    onnx_path = tmp_path / "demo.onnx"
    out = run("compress", "demo", "--compression", "0.66", "-o", str(onnx_path), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["report"]
    assert report["totals"]["macs_removed"] >= 0.66
    assert onnx_path.exists()
    chk = run("check", str(onnx_path), "--json")
    assert chk.returncode == 0, chk.stdout + chk.stderr
    # a human table by default
    human = run("check", str(onnx_path))
    assert human.returncode == 0 and "layer1.conv1" in human.stdout


def test_demo():
    out = run("demo")
    assert out.returncode == 0, out.stderr
    assert "demo OK" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("analyze", "torchvision:resnet19"), "closest: resnet18"),
    (("analyze", "nonsense"), "Accepted forms"),
    (("analyze", "demo", "--input-shape", "1,3,x"), "--input-shape"),
    (("compress", "demo", "--compression", "1.5"), "1.5"),
    (("compress", "demo", "--json-file", "missing.json"), "missing.json"),
    (("check", "missing.onnx"), "missing.onnx"),
])
def test_bad_input_exits_2_with_one_line_reason(args, message, tmp_path):
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_check_rejects_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    out = run("check", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_plot_draws_a_png_or_names_the_missing_extra(tmp_path):
    out = run("compress", "demo", "--plot", str(tmp_path / "a.png"), cwd=tmp_path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out.returncode == 2 and "pip install 'vbxfx[plot]'" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
