"""Progress of long steps: compress(progress=), reconstruct(progress=), the CLI's console."""

import io
import logging

import pytest
import torch

import vbxfx
from vbxfx.cli.console import Console, TqdmHandler
from vbxfx.inputs.demo import DemoNet
from vbxfx.errors import ConfigError


def test_compress_reports_every_stage_in_order():
    calls = []
    x = torch.randn(1, 3, 64, 64)
    calib = torch.randn(4, 3, 64, 64)
    result = vbxfx.compress(DemoNet(), x, compression=0.66, calib_data=calib,
                            progress=lambda *a: calls.append(a))
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["trace", "analyze", "allocate", "rewrite",
                      "refit: layers"]
    for stage in stages:
        steps = [(done, total) for s, done, total in calls if s == stage]
        total = steps[0][1]
        assert steps[0] == (0, total) and steps[-1] == (total, total)
        assert [d for d, _ in steps] == sorted(d for d, _ in steps)
    refit = result.report["reconstruct"]
    assert [t for s, _, t in calls if s == "refit: layers"][0] == refit["layers"] == 10
    before, after = refit["mean_output_error"]
    assert after < before
    with pytest.raises(ConfigError, match="progress must be a callable"):
        vbxfx.compress(DemoNet(), x, progress="yes")


def test_console_plain_lines_and_logging_through_it(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    con = Console(live=False)
    log = logging.getLogger("vbxfx.test_progress")
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        con.progress("refit: layers", 0, 3)
        log.warning("in the middle")
        con.progress("refit: layers", 3, 3)
        with pytest.raises(RuntimeError):
            with con.stage("export"):
                raise RuntimeError("boom")
    finally:
        log.removeHandler(handler)
    lines = err.getvalue().splitlines()
    assert lines[0] == "  refit: layers 0/3 ..."
    assert lines[1] == "WARNING in the middle"
    assert lines[2].startswith("  refit: layers: done in ")
    assert lines[3].startswith("  export: failed after ")


def test_live_console_draws_a_bar_and_logs_above_it(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    con = Console(live=True)
    con.progress("refit: layers", 0, 4)
    con.progress("refit: layers", 2, 4)
    con.note("a note")
    con.progress("refit: layers", 4, 4)
    text = err.getvalue()
    assert "refit: layers  2/4 |" in text and "refit: layers  4/4 |" in text
    screen = [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]
    assert "a note" in screen                 # on a line of its own, not inside the bar
    quiet = Console(quiet=True, live=True)
    quiet.progress("trace", 0, 1)
    quiet.progress("trace", 1, 1)
    assert err.getvalue() == text
