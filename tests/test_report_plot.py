"""The allocation plot: its legend names each level with the colour its bars have."""

import pytest
import torch

import vbxfx
from vbxfx.inputs.demo import DemoNet
from vbxfx.cli.report import plot_allocation

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402


def _level(label: str) -> str | None:
    for level in ("1:4", "2:4", "dense"):
        if level in label and "before" not in label:
            return level
    return None


def test_legend_colours_are_the_bars_colours(tmp_path, monkeypatch):
    x = torch.randn(1, 3, 64, 64)
    report = vbxfx.compress(DemoNet(), x, compression=0.66).report
    levels = {r["repeat"] for r in report["layers"] if r["fmt"] != "dense"}
    assert levels == {1, 2}, "the demo should mix 1:4 and 2:4 layers"
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)        # keep the figure to inspect it
    path = tmp_path / "allocation.png"
    plot_allocation(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    ax = fig.axes[0]
    full = [c for c in ax.containers if len(c) == len(report["layers"])]
    assert len(full) == 2                                    # before and after, one bar per layer
    after = full[1]
    bar_colour: dict[str, set[str]] = {}
    for row, bar in zip(report["layers"], after):
        level = {1: "1:4", 2: "2:4"}.get(row["repeat"], "dense") if row["fmt"] != "dense" else "dense"
        bar_colour.setdefault(level, set()).add(to_hex(bar.get_facecolor()))
    legend = ax.get_legend()
    entries = {}
    for handle, text in zip(legend.legend_handles, legend.get_texts()):
        level = _level(text.get_text())
        if level is not None:
            entries[level] = to_hex(handle.get_facecolor())
    assert set(bar_colour) <= set(entries), (entries, bar_colour)
    for level, colours in bar_colour.items():
        assert colours == {entries[level]}, f"{level}: bars {colours}, legend {entries[level]}"
    assert len(set(entries.values())) == len(entries)       # every level its own colour
    fig.clf()
