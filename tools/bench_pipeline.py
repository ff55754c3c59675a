"""Time the vbxfx pipeline stage by stage, beside a plain TorchScript ONNX export.

Each model runs the stages of ``PIPELINE`` in order, ``--runs`` times; the table shows the
median and best time per stage and what the stage reported. Stages share a context dict
(``model``, ``reference_model``, ``inputs``, ``tmp`` and whatever earlier stages put
there), so a later stage
(rewrite, export, check) is one more ``Stage`` appended to ``PIPELINE``.

    python tools/bench_pipeline.py [--models resnet18 yolov8n] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import vbxfx
from vbxfx.passes import AnalyzeLayers, ChannelFlow


@dataclasses.dataclass(frozen=True)
class Stage:
    """One timed step: ``run(ctx)`` may store results in ``ctx`` and returns a short note."""

    name: str
    run: Callable[[dict[str, Any]], str]
    #: Reference stages are timed but not part of the vbxfx total.
    reference: bool = False


def _trace(ctx: dict[str, Any]) -> str:
    ctx["gm"] = vbxfx.trace(ctx["model"], ctx["inputs"])
    return f"frontend={ctx['gm'].meta['vbxfx.frontend']}, {len(ctx['gm'].graph.nodes)} nodes"


def _analyze(ctx: dict[str, Any]) -> str:
    table = AnalyzeLayers()(ctx["gm"]).details
    ctx["table"] = table
    return f"{len(table)} layers ({len(table.eligible())} eligible), {table.total_macs:,} MACs"


def _channel_flow(ctx: dict[str, Any]) -> str:
    graph = ChannelFlow()(ctx["gm"]).details
    return f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges"


def _onnx_plain(ctx: dict[str, Any]) -> str:
    path = os.path.join(ctx["tmp"], "plain.onnx")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(ctx["reference_model"], ctx["inputs"], path, dynamo=False)
    return f"{os.path.getsize(path) / 1e6:.1f} MB"


#: The stages every model runs, in order.
PIPELINE: list[Stage] = [
    Stage("trace", _trace),
    Stage("analyze", _analyze),
    Stage("channel_flow", _channel_flow),
    Stage("onnx export (plain, dynamo=False)", _onnx_plain, reference=True),
]


def _resnet18() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import torchvision

    return torchvision.models.resnet18(weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def _yolov8n() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False).eval(), (torch.randn(1, 3, 640, 640),)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]] = {
    "resnet18": _resnet18,
    "yolov8n": _yolov8n,
}


def bench(name: str, runs: int) -> list[tuple[str, str, list[float], str]]:
    """Rows (model, stage, times, note) for one model."""
    model, inputs = MODELS[name]()
    # The plain export runs the model, and ultralytics then caches its anchors in it: a copy
    # keeps that out of the model the vbxfx stages see, so every run traces the same graph.
    reference_model = copy.deepcopy(model)
    times: dict[str, list[float]] = {stage.name: [] for stage in PIPELINE}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            ctx: dict[str, Any] = {"model": model, "reference_model": reference_model,
                                   "inputs": inputs, "tmp": tmp}
            for stage in PIPELINE:
                t0 = time.perf_counter()
                notes[stage.name] = stage.run(ctx)
                times[stage.name].append(time.perf_counter() - t0)
    rows = [(name, stage.name, times[stage.name], notes[stage.name]) for stage in PIPELINE]
    vbxfx_runs = [sum(t) for t in zip(*(times[s.name] for s in PIPELINE if not s.reference))]
    rows.append((name, "vbxfx total (" + " + ".join(s.name for s in PIPELINE
                                                     if not s.reference) + ")",
                 vbxfx_runs, ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runs", type=int, default=3, help="timed runs per stage (median shown)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.runs} runs per stage")
    rows = [row for name in args.models for row in bench(name, args.runs)]
    width = max(len(stage) for _, stage, _, _ in rows)
    print(f"{'model':<9} {'stage':<{width}} {'median s':>9} {'best s':>7}  note")
    for name, stage, times, note in rows:
        print(f"{name:<9} {stage:<{width}} {statistics.median(times):>9.3f} "
              f"{min(times):>7.3f}  {note}")


if __name__ == "__main__":
    main()
