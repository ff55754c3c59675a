"""Per-layer overrides in the seed's json_file format."""

import json
import logging

import pytest

from vbxfx.errors import ConfigError
from vbxfx.analysis.layers import LayerInfo, LayerTable
from vbxfx.allocation.overrides import load_overrides, merged_overrides, resolve_overrides


def _layer(name, eligible=True):
    return LayerInfo(name, "conv2d", name.replace(".", "_"), (16, 16, 1, 1), (1, 16, 4, 4),
                     (1, 16, 4, 4), 1, 16, 16, 1, 1, 16, 4096, {4: 4096, 2: 2048, 1: 1024}, 256,
                     eligible, None if eligible else "depthwise conv (groups=16)")


@pytest.fixture
def table():
    return LayerTable([_layer("stem"), _layer("block.0.conv"), _layer("block.1.conv"),
                       _layer("block.1.dw", eligible=False), _layer("head")])


def test_seed_values(table):
    got = resolve_overrides({"stem": 0.5, "head": 0.75, "block.0.conv": "dense"}, table)
    assert got == {"stem": 2, "block.0.conv": 4, "head": 1}


def test_nearest_level_with_warning(table, caplog):
    with caplog.at_level(logging.WARNING, logger="vbxfx.allocation.overrides"):
        got = resolve_overrides({"stem": 0.66, "head": 0.55, "block.0.conv": 0.1}, table)
    assert got == {"stem": 1, "block.0.conv": 4, "head": 2}
    assert "'stem' asks for compression 0.66" in caplog.text and "nearest level 0.75" in caplog.text
    assert "'head'" in caplog.text


def test_exact_name_beats_glob_and_ineligible_skipped(table, caplog):
    with caplog.at_level(logging.WARNING, logger="vbxfx.allocation.overrides"):
        got = resolve_overrides({"block.*": 0.75, "block.1.conv": 0.5}, table)
    assert got == {"block.0.conv": 1, "block.1.conv": 2}
    assert caplog.text == ""  # the glob skips the depthwise layer silently
    with caplog.at_level(logging.WARNING, logger="vbxfx.allocation.overrides"):
        assert resolve_overrides({"block.1.dw": 0.5}, table) == {}
    assert "'block.1.dw' is not compressible" in caplog.text


def test_unknown_names_list_closest(table):
    with pytest.raises(ConfigError, match=r"'block.0.cnv' \(closest: \['block.0.conv'"):
        resolve_overrides({"block.0.cnv": 0.5, "stem": 0.5}, table)
    with pytest.raises(ConfigError, match="'nothing.*'"):
        resolve_overrides({"nothing.*": 0.5}, table)


@pytest.mark.parametrize("value", [1.5, -0.1, "half", None, True, float("nan")])
def test_bad_values(table, value):
    with pytest.raises(ConfigError, match="layer 'stem'"):
        resolve_overrides({"stem": value}, table)


def test_ucomp_values(table):
    assert resolve_overrides({"stem": 0.73, "head": "dense"}, table, fmt="ucomp") == {
        "stem": 0.73, "head": 0.0}
    with pytest.raises(ConfigError, match=r"\[0.5, 1\)"):
        resolve_overrides({"stem": 0.3}, table, fmt="ucomp")


def test_json_file_and_argument_merge(table, tmp_path):
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"stem": 0.5, "head": 0.75}))
    assert merged_overrides(table, path, {"head": "dense"}) == {"stem": 2, "head": 4}


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.json' does not exist"):
        load_overrides(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{'stem': 0.5")
    with pytest.raises(ConfigError, match="bad.json' is not valid JSON"):
        load_overrides(bad)
    arr = tmp_path / "list.json"
    arr.write_text("[0.5]")
    with pytest.raises(ConfigError, match="list.json' must hold a JSON object"):
        load_overrides(arr)


# --------------------------------------------------------------------------- a mapping


def test_json_file_may_be_a_mapping(table):
    assert load_overrides({"stem": 0.5}) == {"stem": 0.5}
    assert merged_overrides(table, {"stem": 0.5, "head": "dense"}) == {"stem": 2, "head": 4}
    with pytest.raises(ConfigError, match=r"json_file \(a dict\) names 1 layer"):
        merged_overrides(table, {"nope": 0.5})
    with pytest.raises(ConfigError, match="json_file must be a path to a JSON file or a mapping"):
        load_overrides(3)


def test_compress_and_compress_vbx3_take_a_mapping(caplog):
    import torch
    from torch import nn

    import vbxfx

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    x = torch.randn(1, 8, 8, 8)
    result = vbxfx.compress(net(), x, compression=0.5, json_file={"0": 0.75, "5": "dense"})
    rows = {r["name"]: r for r in result.report["layers"]}
    assert rows["5"]["fmt"] == "dense" and rows["0"]["repeat"] == 1
    model = net()
    report = vbxfx.compress_vbx3(model, 0.5, json_file={"0": 0.75})
    assert report["layers"]["0"]["repeat"] == 1
    every = {"0": 0.5, "2": 0.75, "5": "dense"}        # sets every layer: compression unused
    with caplog.at_level(logging.INFO, logger="vbxfx.seed_api"):
        report = vbxfx.compress_vbx3(net(), 0.6, json_file=every)
    assert "json_file (a dict) sets every layer" in caplog.text
    assert {n: r["repeat"] for n, r in report["layers"].items()} == {"0": 2, "2": 1}
