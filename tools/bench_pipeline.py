"""Time the vbxfx pipeline stage by stage, beside a plain ONNX export of the same model.

Each model runs the stages of ``PIPELINE`` in order, ``--runs`` times; the table shows the
median and best time per stage and what the stage reported. Stages share a context dict
(``model``, ``reference_model``, ``inputs``, ``tmp``, ``options`` and whatever earlier
stages put there), so a new step is one more ``Stage`` appended to ``PIPELINE``.

The vbxfx stages are what ``vbxfx compress -o model.onnx`` does with data-free ("weight")
sensitivity, each pass run on its own the way :func:`vbxfx.compress` chains them:
trace -> AnalyzeLayers -> Allocate -> Rewrite (+ the report) -> export_onnx -> check_onnx
(the CLI's check: ONNX checker, format rules, onnxruntime vs torch on the example input and
``--check-random`` random inputs). Their sum is the "vbxfx total". ChannelFlow is timed as
an informational stage (``vbxfx compress`` does not run it; not in the total).

Two plain exports of the uncompressed model are the references, each on a fresh deep copy
(copied outside the timing):

- ``plain torch.onnx.export``: the call a user writes, ``torch.onnx.export(model, inputs,
  path)`` with torch's defaults (``dynamo=True`` since torch 2.9);
- ``plain export, same exporter``: ``torch.onnx.export`` with the exporter that vbxfx's
  ``export_onnx`` picks for the model (``choose_exporter``): TorchScript (``dynamo=False``,
  under ``torch.no_grad()``) for ordinary models, dynamo for ultralytics ones.

The last lines per model are the ratios vbxfx total / each reference against the
``--target`` (issue #8: within 3x of a plain export). The plain exports are the last stages
of a run, so with ``--runs 1`` vbxfx's export pays the exporter's first-use cost; use the
medians of several runs.

    python tools/bench_pipeline.py [--models resnet18 yolov8n] [--runs 3] [--threads 2]
                                   [--compression 0.66] [--check-random 2] [--target 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import inspect
import io
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import vbxfx
from vbxfx.export.onnx_export import choose_exporter
from vbxfx.passes import Allocate, AnalyzeLayers, ChannelFlow, Rewrite
from vbxfx.pipeline import build_report
from vbxfx.analysis.trace import ROOT_KEY


@dataclasses.dataclass(frozen=True)
class Stage:
    """One timed step: ``run(ctx)`` may store results in ``ctx`` and returns a short note."""

    name: str
    run: Callable[[dict[str, Any]], str]
    #: Reference stages (the plain export) are timed but not part of the vbxfx total.
    reference: bool = False
    #: Informational stages are timed and shown but not part of the vbxfx total either.
    informational: bool = False

    @property
    def in_total(self) -> bool:
        return not (self.reference or self.informational)


class CheckFailed(AssertionError):
    """The check stage found a problem in the exported file (the message has the report)."""


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


def _allocate(ctx: dict[str, Any]) -> str:
    alloc = Allocate(ctx["options"]["compression"], budget="macs", sensitivity="weight",
                     fmt="comp")(ctx["gm"]).details
    ctx["alloc"] = alloc
    levels = [alloc.repeats[n] for n in alloc.repeats]
    return (f"target {alloc.target:g}, achieved {alloc.achieved:.3f}; R1 x{levels.count(1)}, "
            f"R2 x{levels.count(2)}, dense x{levels.count(4)}")


def _rewrite(ctx: dict[str, Any]) -> str:
    records = Rewrite(dict(ctx["alloc"].repeats))(ctx["gm"]).details
    ctx["compressed"] = ctx["gm"].meta[ROOT_KEY]
    report = build_report(ctx["table"], ctx["alloc"], records, ctx["compressed"])
    totals = report["totals"]
    return (f"{totals['compressed']} layers swapped, hardware MACs removed "
            f"{totals['macs_removed']:.3f}")


def _export(ctx: dict[str, Any]) -> str:
    ctx["onnx"] = os.path.join(ctx["tmp"], "vbxfx.onnx")
    report = vbxfx.export_onnx(ctx["compressed"], ctx["inputs"], ctx["onnx"])
    return (f"{report.exporter}, {len(report.layers)} annotated layers, "
            f"{report.size_bytes / 1e6:.1f} MB")


def _check(ctx: dict[str, Any]) -> str:
    report = vbxfx.check_onnx(ctx["onnx"], torch_model=ctx["compressed"],
                              example_inputs=ctx["inputs"],
                              n_random=ctx["options"]["check_random"])
    if not report.ok:
        raise CheckFailed(f"vbxfx check failed on {ctx['onnx']}:\n{report}")
    t = report.totals()
    return (f"ok: {t['fit']}/{t['layers']} layers fit, {t['compared']} outputs compared, "
            f"max rel {t['max_rel']:.2g}")


DEFAULT_STAGE = "plain torch.onnx.export"
SAME_STAGE = "plain export, same exporter"
#: What ``torch.onnx.export`` does when the caller does not say (True since torch 2.9).
DEFAULT_DYNAMO = bool(inspect.signature(torch.onnx.export).parameters["dynamo"].default)


def _quiet_export(model: torch.nn.Module, inputs: tuple, path: str, **kwargs: Any) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, path, **kwargs)


def _plain_default(ctx: dict[str, Any]) -> str:
    """``torch.onnx.export(model, inputs, path)``: torch's defaults, as a user calls it."""
    path = os.path.join(ctx["tmp"], "default.onnx")
    _quiet_export(ctx["default_model"].eval(), ctx["inputs"], path)
    exporter = "dynamo" if DEFAULT_DYNAMO else "torchscript"
    return _sized(path, f"torch defaults: {exporter}")


def _plain_export(ctx: dict[str, Any]) -> str:
    """``torch.onnx.export`` as vbxfx's ``export_onnx`` calls it (quiet, same exporter)."""
    model = ctx["reference_model"].eval()
    dynamo = choose_exporter(model)
    path = os.path.join(ctx["tmp"], "plain.onnx")
    if dynamo:
        _quiet_export(model, ctx["inputs"], path, dynamo=True)
    else:
        with torch.no_grad():
            _quiet_export(model, ctx["inputs"], path, dynamo=False)
    return _sized(path, "dynamo (dynamo=True)" if dynamo else "torchscript (dynamo=False)")


def _sized(path: str, exporter: str) -> str:
    """``exporter`` and the file size (the dynamo exporter's side ``.data`` file removed)."""
    data = path + ".data"     # the dynamo exporter writes the weights beside the graph
    if os.path.exists(data):
        size = os.path.getsize(path) + os.path.getsize(data)
        os.remove(data)
        return f"{exporter}, {size / 1e6:.1f} MB (graph + external .data)"
    return f"{exporter}, {os.path.getsize(path) / 1e6:.1f} MB"


#: The stages every model runs, in order.
PIPELINE: list[Stage] = [
    Stage("trace", _trace),
    Stage("analyze", _analyze),
    Stage("channel_flow (info)", _channel_flow, informational=True),
    Stage("allocate", _allocate),
    Stage("rewrite", _rewrite),
    Stage("export", _export),
    Stage("check", _check),
    Stage(DEFAULT_STAGE, _plain_default, reference=True),
    Stage(SAME_STAGE, _plain_export, reference=True),
]


def _resnet18() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import torchvision

    return torchvision.models.resnet18(weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def _mobilenet_v3_large() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    import torchvision

    return (torchvision.models.mobilenet_v3_large(weights=None).eval(),
            (torch.randn(1, 3, 224, 224),))


def _yolov8n() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False).eval(), (torch.randn(1, 3, 640, 640),)


def _demo() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from vbxfx.inputs.demo import DemoNet

    return DemoNet().eval(), (torch.randn(*DemoNet.example_input_shape),)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]] = {
    "resnet18": _resnet18,
    "mobilenet_v3_large": _mobilenet_v3_large,
    "yolov8n": _yolov8n,
    "demo": _demo,   # a few seconds: the smoke test's model
}
#: What runs without --models.
DEFAULT_MODELS = ["resnet18", "mobilenet_v3_large", "yolov8n"]


@dataclasses.dataclass
class Result:
    """One model's times (seconds per run) and last note per stage of ``PIPELINE``."""

    model: str
    times: dict[str, list[float]]
    notes: dict[str, str]

    @property
    def total(self) -> list[float]:
        """The vbxfx total of each run (the stages with ``in_total``)."""
        return [sum(t) for t in zip(*(self.times[s.name] for s in PIPELINE if s.in_total))]

    def ratio(self, reference: str) -> float:
        """Median vbxfx total over the median time of the reference stage ``reference``."""
        return statistics.median(self.total) / statistics.median(self.times[reference])

    def rows(self) -> list[tuple[str, str, list[float], str]]:
        """``(model, stage, times, note)`` per stage, then the vbxfx total."""
        rows = [(self.model, s.name, self.times[s.name], self.notes[s.name]) for s in PIPELINE]
        names = "+".join(s.name for s in PIPELINE if s.in_total)
        rows.append((self.model, f"vbxfx total ({names})", self.total, ""))
        return rows


def bench(name: str, runs: int, compression: float = 0.66, check_random: int = 2) -> Result:
    """Run ``PIPELINE`` ``runs`` times on model ``name``; raises what a stage raises."""
    model, inputs = MODELS[name]()
    # The plain export runs the model, and ultralytics then caches its anchors in it (a
    # FakeTensor after a dynamo export): each run exports a fresh copy, made untimed, and the
    # model the vbxfx stages see stays as built, so every run traces the same graph.
    reference = copy.deepcopy(model)
    options = {"compression": compression, "check_random": check_random}
    times: dict[str, list[float]] = {stage.name: [] for stage in PIPELINE}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            ctx: dict[str, Any] = {"model": model, "reference_model": copy.deepcopy(reference),
                                   "default_model": copy.deepcopy(reference),
                                   "inputs": inputs, "tmp": tmp, "options": options}
            gc.collect()
            for stage in PIPELINE:
                t0 = time.perf_counter()
                notes[stage.name] = stage.run(ctx)
                times[stage.name].append(time.perf_counter() - t0)
            del ctx
    return Result(name, times, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    ap.add_argument("--runs", type=int, default=3, help="timed runs per stage (median shown)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compression", type=float, default=0.66,
                    help="fraction of hardware MACs to remove (default 0.66)")
    ap.add_argument("--check-random", type=int, default=2,
                    help="random input sets the check compares on (default 2, as vbxfx check)")
    ap.add_argument("--target", type=float, default=3.0,
                    help="the vbxfx total should be within this many plain exports (default 3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.runs} runs per stage, "
          f"compression {args.compression:g} (macs budget, weight sensitivity, comp), check "
          f"with {args.check_random} random input(s)")
    print(f"{DEFAULT_STAGE} = torch.onnx.export(model, inputs, path) with torch's defaults "
          f"(dynamo={DEFAULT_DYNAMO}); {SAME_STAGE} = the exporter vbxfx's export_onnx picks: "
          "TorchScript (dynamo=False, no_grad) for torchvision models, dynamo for ultralytics; "
          "channel_flow (info) is not in the vbxfx total")
    results = []
    for name in args.models:
        results.append(bench(name, args.runs, args.compression, args.check_random))
    rows = [row for r in results for row in r.rows()]
    mwidth = max(len(m) for m, _, _, _ in rows)
    width = max(len(stage) for _, stage, _, _ in rows)
    print(f"{'model':<{mwidth}} {'stage':<{width}} {'median s':>9} {'best s':>7}  note")
    for name, stage, times, note in rows:
        print(f"{name:<{mwidth}} {stage:<{width}} {statistics.median(times):>9.3f} "
              f"{min(times):>7.3f}  {note}".rstrip())
    print()
    for r in results:
        total = statistics.median(r.total)
        print(f"{r.model}: vbxfx total {total:.2f} s (best {min(r.total):.2f})")
        for ref in (DEFAULT_STAGE, SAME_STAGE):
            plain, ratio = statistics.median(r.times[ref]), r.ratio(ref)
            verdict = "meets" if ratio <= args.target else "MISSES"
            print(f"  vs {ref}: {plain:.2f} s (best {min(r.times[ref]):.2f}); ratio "
                  f"{ratio:.2f}x (best/best {min(r.total) / min(r.times[ref]):.2f}x) -> "
                  f"{verdict} the {args.target:g}x target")


if __name__ == "__main__":
    main()
