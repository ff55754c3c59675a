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


# ------------------------------------------------------------------ what a new user meets


def test_help_and_version_import_nothing_heavy():
    """``--help`` / ``--version`` took 7-11 s when ``import vbxfx`` loaded torch, onnx and
    onnxruntime; building the parser must load none of them."""
    code = ("import sys, vbxfx.cli; vbxfx.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_package_names_are_lazy_but_complete():
    code = """
import sys, vbxfx
assert 'torch' not in sys.modules
assert 'compress' in dir(vbxfx) and set(vbxfx.__all__) <= set(dir(vbxfx))
from vbxfx import compress, check_onnx, trace
import vbxfx.trace, vbxfx.reconstruct          # the submodules of the same names
assert vbxfx.trace is trace and callable(vbxfx.reconstruct) and callable(vbxfx.distill)
assert vbxfx.compress is compress and vbxfx.export.SCHEMA == 'vbxfx.compression/1'
assert all(getattr(vbxfx, n) is not None for n in vbxfx.__all__)
try:
    vbxfx.no_such_name
except AttributeError as e:
    assert 'no_such_name' in str(e)
else:
    raise SystemExit('no AttributeError')
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_stages_show_as_they_run_and_the_refit_result_is_printed():
    out = run("compress", "demo", "--calib", "skimage:8", "--max-rows", "2")
    assert out.returncode == 0, out.stderr
    for stage in ("trace", "analyze", "allocate", "rewrite", "refit: layers"):
        assert f"  {stage}" in out.stderr, (stage, out.stderr)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("refit:"))
    assert "layer(s) refit on 8 calibration image(s); mean relative output error" in line
    assert line.endswith("(layer by layer on the compressed model's inputs)"), line
    before, after = (float(v) for v in line.rsplit("error ", 1)[1].split(" (")[0].split(" -> "))
    assert after < before


def test_log_lines_do_not_break_progress_lines():
    out = run("-v", "compress", "demo")
    assert out.returncode == 0, out.stderr
    lines = [ln.rsplit("\r", 1)[-1] for ln in out.stderr.splitlines()]
    logged = [ln for ln in lines if "INFO " in ln]
    assert logged and all(ln.startswith("INFO ") for ln in logged), out.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_threads_before_or_after_the_command(where):
    opts = ["-q", "--threads", "1"]
    args = opts + ["compress", "demo"] if where == "before" else ["compress", "demo"] + opts
    out = run(*args)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and "hardware MACs" in out.stdout


def test_threads_option_and_environment(monkeypatch):
    import torch

    from vbxfx.cli.main import default_threads, main

    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved, env = torch.get_num_threads(), os.environ.pop("OMP_NUM_THREADS", None)
    try:
        assert main(["-q", "--threads", "1", "analyze", "demo"]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        os.environ["OMP_NUM_THREADS"] = "2"            # the user's setting is kept
        assert main(["-q", "analyze", "demo"]) == 0
        assert torch.get_num_threads() == 2
        del os.environ["OMP_NUM_THREADS"]
        cpus = len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))     # an idle machine
        assert default_threads() == cpus
        monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 3.0, 0.0, 0.0))   # a busy one
        assert default_threads() == 1
        assert main(["-q", "analyze", "demo"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        if env is not None:
            os.environ["OMP_NUM_THREADS"] = env
    assert run("--threads", "0", "analyze", "demo").returncode == 2


def test_demo_says_the_file_is_temporary_and_how_to_keep_it(tmp_path):
    out = run("demo", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "add -o demo.onnx to keep it" in out.stderr
    kept = run("demo", "-o", "kept.onnx", cwd=tmp_path)
    assert kept.returncode == 0 and (tmp_path / "kept.onnx").exists()
    assert run("check", "kept.onnx", cwd=tmp_path).returncode == 0


def test_check_says_what_it_did_not_compare(tmp_path):
    path = tmp_path / "demo.onnx"
    assert run("compress", "demo", "-o", str(path)).returncode == 0
    alone = run("check", str(path))
    assert alone.returncode == 0, alone.stderr
    assert "onnxruntime vs torch: not compared (no torch model given)" in alone.stdout
    assert "--model" in alone.stderr
    # a freshly built (dense) DemoNet is not the model the file came from: say so
    fresh = run("check", str(path), "--model", "demo")
    assert fresh.returncode == 1
    assert "the torch model's weights are not the exported ones" in fresh.stdout
    saved = tmp_path / "compressed.pt"
    assert run("compress", "demo", "--save", str(saved), "-o", str(path)).returncode == 0
    same = run("check", str(path), "--model", str(saved))
    assert same.returncode == 0 and "not the exported ones" not in same.stdout, same.stdout


RMS_MODEL = '''
import torch
from torch import nn

class Net(nn.Module):            # rms_norm: the TorchScript exporter fails, dynamo exports it
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x):
        return torch.nn.functional.rms_norm(self.conv(x), (14,))

def make():
    return Net().eval()

def needs(width):
    return Net()

def broken():
    raise RuntimeError("no weights here")
'''


def test_json_stdout_is_json_alone_when_the_exporter_falls_back(tmp_path):
    (tmp_path / "net.py").write_text(RMS_MODEL)
    out = run("compress", "net.py:make", "--input-shape", "1,3,16,16", "--compression", "0.5",
              "-o", "net.onnx", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)                  # the graph dump must not be in stdout
    assert data["export"]["exporter"] == "dynamo"


BAD_INPUT = [
    (("compress", "demo", "-o", "folder"), "is a directory"),
    (("compress", "demo", "-o", "/sys/demo.onnx"), "cannot write into folder '/sys'"),
    (("compress", "demo", "--save", "/sys/m.pt"), "cannot write into folder '/sys'"),
    (("compress", "demo", "--save", "missing/m.pt"), "does not exist"),
    (("compress", "demo", "--plot", "folder"), "is a directory"),
    (("demo", "-o", "folder"), "is a directory"),
    (("compress", "demo", "--calib", "skimage:abc"), "skimage:N with N a positive"),
    (("compress", "demo", "--calib", "skimage:0"), "skimage:N with N a positive"),
    (("compress", "demo", "--calib", "skimage:-3"), "skimage:N with N a positive"),
    (("analyze", "demo", "--input-shape", "1,3,100000,100000"), "the input alone is 120.0 GB"),
    (("analyze", "net.py:needs"), "needs argument(s) width"),
    (("analyze", "net.py:broken"), "raised RuntimeError: no weights here"),
    (("check", "x.onnx", "--weights", "w.pt"), "--weights needs --model"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_more_bad_input_exits_2_with_one_line(args, message, tmp_path):
    """/sys refuses new files to root too (chmod does not stop root)."""
    (tmp_path / "net.py").write_text(RMS_MODEL)
    (tmp_path / "folder").mkdir()
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len([ln for ln in out.stderr.splitlines() if "error:" in ln]) == 1, out.stderr


FROZEN_FACTORY = """
import torch
from torch import nn

def make():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                      nn.Conv2d(16, 16, 1))
    m[4].weight.requires_grad_(False)          # a fixed layer, like ultralytics' DFL conv
    return m
"""


def test_include_frozen_and_skipped_layers_on_the_command_line(tmp_path):
    (tmp_path / "frozen.py").write_text(FROZEN_FACTORY)
    spec = f"{tmp_path / 'frozen.py'}:make"
    plain = run("compress", spec, "--input-shape", "1,3,16,16", "--json", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    rows = {r["name"]: r for r in json.loads(plain.stdout)["report"]["layers"]}
    assert rows["4"]["fmt"] == "dense" and "frozen" in rows["4"]["reason"]
    forced = run("compress", spec, "--input-shape", "1,3,16,16", "--include-frozen", "--json",
                 cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    rows = {r["name"]: r for r in json.loads(forced.stdout)["report"]["layers"]}
    assert rows["4"]["fmt"] == "comp"


@pytest.mark.slow
def test_json_stays_json_when_ultralytics_prints_its_settings_banner(tmp_path):
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "fresh")}
    out = subprocess.run(CMD + ["compress", "ultralytics:yolov8n.yaml", "--input-shape",
                                "1,3,64,64", "--json"], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["report"]["totals"]["compressed"] > 0
    assert (tmp_path / "fresh").exists()          # ultralytics did write (and announce) settings


def test_the_refit_line_says_how_the_layers_were_refit():
    from vbxfx.cli.commands import _refit_line
    report = {"reconstruct": {"method": "local", "layers": 63, "mean_output_error": [0.14, 0.005]}}
    line = _refit_line(report, 8)
    assert line == ("refit: 63 layer(s) refit on 8 calibration image(s); mean relative output "
                    "error 0.1400 -> 0.0050 (each on the dense model's inputs)")
    report["reconstruct"]["method"] = "sequential"
    assert _refit_line(report, None).endswith("(layer by layer on the compressed model's inputs)")


def test_compress_with_int8_finetune(tmp_path):
    """``--int8-finetune STEPS``: after the refit, training under the int8 grids; the saved
    model is the fine-tuned one and still exports and checks."""
    import torch

    onnx_path, saved = tmp_path / "demo.onnx", tmp_path / "demo.pt"
    out = run("compress", "demo", "--compression", "0.5", "--calib", "skimage:24",
              "--int8-finetune", "3", "-o", str(onnx_path), "--save", str(saved), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    tuned = data["int8_finetune"]
    assert tuned["steps"] == 3 and tuned["int8_points"] > 5
    assert data["check"]["ok"] and onnx_path.exists()
    model = torch.load(saved, weights_only=False)
    assert sum(1 for m in model.modules() if type(m).__name__.startswith("VBX")) >= 5
    bad = run("compress", "demo", "--int8-finetune", "3")
    assert bad.returncode == 2 and "--calib" in bad.stderr
    yolo = run("compress", "ultralytics:yolov8n.yaml", "--calib", "skimage:4",
               "--int8-finetune", "3", "--input-shape", "1,3,64,64")
    assert yolo.returncode == 2 and "ultralytics trainer" in yolo.stderr, yolo.stderr[-500:]
