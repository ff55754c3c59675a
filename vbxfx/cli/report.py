"""Text tables and plots of a compression report (the dict ``vbxfx.compress`` returns)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report", "totals_lines", "plot_allocation", "human"]


def human(n: float) -> str:
    """``1814073344 -> '1.81 G'``."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _level(row: dict[str, Any]) -> str:
    if row.get("fmt") == "ucomp":
        return f"ucomp {row.get('compression', 0):.2f}"
    if row.get("fmt") == "dense" or not row.get("eligible", True):
        return "dense"
    return {1: "1:4 (R1)", 2: "2:4 (R2)", 4: "dense"}.get(row.get("repeat"), str(row.get("repeat")))


def format_report(report: dict[str, Any], max_rows: int | None = None) -> str:
    """Per-layer table (name, shape, level, hardware MACs dense / after, projection error,
    paired share) and totals, every MAC figure named as the README defines it ("What the MAC
    figures mean")."""
    rows = report["layers"]
    hw = report.get("mac_kind", "hardware") == "hardware"
    unit = "HW MACs" if hw else "MACs"
    head = ("layer", "shape", "level", f"{unit} dense", f"{unit} after", "proj. err", "paired")
    body = []
    shown = rows if max_rows is None else rows[:max_rows]
    for r in shown:
        shape = "x".join(map(str, r.get("weight_shape", ()))) or "-"
        dense = r.get("fmt") == "dense"
        body.append((r["name"], shape, _level(r) if r.get("eligible", True) else f"dense ({r.get('reason')})",
                     human(r["macs_before"]), human(r["macs_after"]),
                     "-" if dense else f"{r.get('projection_error', 0):.4f}",
                     "-" if dense else f"{100 * r.get('paired_fraction', 0):.0f}%"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {3, 4, 5, 6}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    if max_rows is not None and len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more layers (--json for all)")
    out.append("")
    out += totals_lines(report)
    return "\n".join(out)


def totals_lines(report: dict[str, Any]) -> list[str]:
    """The totals of a compression report: standard MACs, dense hardware MACs, hardware MACs
    after, the share removed (of the dense hardware MACs) and the target."""
    t = report["totals"]
    removed = t.get("macs_removed", 0.0)
    ratio = t["macs_before"] / t["macs_after"] if t["macs_after"] else float("inf")
    hw = report.get("mac_kind", "hardware") == "hardware"
    out = [f"layers: {t['layers']} ({t['compressed']} compressed)"]
    if "macs" in t:
        out.append(f"standard MACs (the float model's multiplies): {human(t['macs'])}")
    if hw:
        out.append(f"hardware MACs: {human(t['macs_before'])} dense (R=4, input channels padded "
                   f"to 8) -> {human(t['macs_after'])} after compression: {100 * removed:.1f}% "
                   f"of the dense hardware MACs removed ({ratio:.2f}x fewer)")
    else:
        out.append(f"multiplies: {human(t['macs_before'])} dense -> {human(t['macs_after'])} "
                   f"after int8 (pairs once): {100 * removed:.1f}% removed ({ratio:.2f}x fewer)")
    if t.get("other_macs"):
        out.append(f"  of which {human(t['other_macs'])} in other multiply-heavy ops (attention "
                   "matmuls, ...), dense before and after")
    target = report.get("target")
    shrink = report.get("shrink")
    if shrink is not None and target is not None:
        pruned = [g for g in shrink["groups"] if g["kept"] < g["channels"]]
        stuck = [g for g in shrink["groups"] if not g["prunable"]]
        kept = sum(g["kept"] for g in pruned)
        total = sum(g["channels"] for g in pruned)
        out.append(f"target: {target:.3f} of the whole model's dense hardware MACs removed; "
                   f"reached {report.get('achieved', 0):.3f} (methods: "
                   f"{', '.join(report.get('methods', ()))})")
        out.append(f"channels: {len(pruned)} group(s) pruned ({kept} of {total} channels "
                   f"kept), {len(shrink['low_rank'])} layer(s) as low-rank factors"
                   + (f"; {len(stuck)} group(s) cannot be pruned, e.g. {stuck[0]['name']}: "
                      f"{stuck[0]['reason']}" if stuck else ""))
    elif target is not None:
        budget = report.get("budget")
        what = "dense hardware MACs" if budget == "macs" and hw else (
            "MACs" if budget == "macs" else "weights")
        eligible = report.get("achieved_of_eligible", report.get("achieved", 0))
        out.append(f"target: {target:.3f} of the eligible layers' {what} removed; reached "
                   f"{eligible:.3f} of them, {report.get('achieved', 0):.3f} of the whole "
                   f"model's (sensitivity: {report.get('sensitivity')})")
    out += [f"warning: {w}" for w in report.get("warnings", ())]
    return out


def plot_allocation(report: dict[str, Any], path: str) -> None:
    """Bar chart of MACs per layer before and after, coloured by level, saved to ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'vbxfx[plot]'``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = report["layers"]
    colors = {"1:4 (R1)": "#d62728", "2:4 (R2)": "#1f77b4", "dense": "#7f7f7f"}
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * len(rows)), 4.5))
    xs = range(len(rows))
    before = "#dddddd"
    ax.bar(xs, [r["macs_before"] / 1e6 for r in rows], color=before)
    levels = [_level(r) if r.get("eligible", True) else "dense" for r in rows]
    ax.bar(xs, [r["macs_after"] / 1e6 for r in rows],
           color=[colors.get(lv, "#2ca02c") for lv in levels])
    # proxy artists: a legend entry of a multi-coloured bar container takes its first colour
    shown = [lv for lv in colors if lv in levels] + sorted(set(levels) - set(colors))
    handles = [Patch(facecolor=before, label="before (dense)")]
    handles += [Patch(facecolor=colors.get(lv, "#2ca02c"), label=f"after: {lv}") for lv in shown]
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("hardware MMACs")
    t = report["totals"]
    ax.set_title(f"vbxfx allocation: {human(t['macs_before'])} -> {human(t['macs_after'])} MACs")
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
