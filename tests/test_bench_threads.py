"""A tiny run of tools/bench_threads.py (one setting, one run, the demo model)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_threads  # noqa: E402


def test_bench_threads_prints_a_table(capsys):
    rows = bench_threads.main(["--model", "demo", "--threads", "1", "auto", "--repeat", "1"])
    assert [r[0] for r in rows] == ["1", "auto"]
    assert all(len(times) == 1 and times[0] > 0 for _, times, _ in rows)
    out = capsys.readouterr().out
    assert "vbxfx compress demo" in out and "median s" in out
