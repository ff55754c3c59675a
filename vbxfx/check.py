"""Check an annotated ONNX file: ONNX checker, format fit, annotations, onnxruntime vs torch.

:func:`check_onnx` verifies

1. ``onnx.checker.check_model(path, full_check=True)``;
2. every annotated weight fits its declared repeat after symmetric per-output-channel int8
   quantization (comp), or needs no more multiplies than the annotation counts (ucomp);
3. the annotations agree with the weights (mask = nonzeros, pairs mutual, equal int8
   magnitudes, stated sign relation) - see :mod:`vbxfx.export.verify`;
4. given the torch model, onnxruntime and torch agree on the user's inputs, the example
   inputs and ``n_random`` random inputs: an output passes when
   ``max|onnx - torch| <= atol + rtol * max|torch|``.

A file that cannot be checked (missing, not ONNX, no or newer annotations, inputs of the
wrong shape or dtype) raises :class:`~vbxfx.errors.CheckError`; everything else is a
problem in the report. :func:`run_check_command` is the CLI: exit code 0 when all holds,
1 when something does not, 2 for unusable input.

>>> import vbxfx                                                   # doctest: +SKIP
>>> report = vbxfx.check_onnx("model.onnx", torch_model=model,     # doctest: +SKIP
...                           example_inputs=torch.randn(1, 3, 224, 224))
>>> report.ok, report.totals()["hw_macs"]                          # doctest: +SKIP
(True, 681043968)

The totals are those of ``vbxfx compress`` (README, "What the MAC figures mean"): ``macs``, the
standard MACs of every Conv/ConvTranspose/Gemm/MatMul in the file; ``hw_macs_dense``, the dense
hardware MACs (R=4, input channels padded to 8); ``hw_macs``, the hardware MACs with each
annotated layer at the repeat the compiler will pick from its int8 weights (every node sharing
its weight too), the others dense; ``macs_removed``, of the dense hardware MACs. A layer that
declares a higher repeat than its weights need is a warning: the compiler takes the smaller
one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from vbxfx.errors import CheckError, VbxError
from vbxfx.export.graph import OnnxGraph, attribute
from vbxfx.export.reader import annotated_nodes, load_onnx
from vbxfx.export.verify import dense_mults, verify_layer
from vbxfx.export.macs import complete_shapes, model_macs
from vbxfx.format.cost import hardware_macs

__all__ = ["check_onnx", "CheckReport", "LayerRow", "OutputRow", "DEFAULT_RTOL", "DEFAULT_ATOL",
           "add_check_arguments", "run_check_command", "main_check"]

logger = logging.getLogger(__name__)

#: Default tolerances of the numerical comparison (``atol + rtol * max|torch output|``).
#: onnxruntime and torch differ by about 1e-6 of an output's magnitude on resnet18,
#: mobilenet_v3 and yolov8n; one int8 step in a classifier weight moves it by about 1e-4.
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-6


@dataclass(frozen=True)
class LayerRow:
    """One annotated layer; MACs are per image (batch 1), None when shapes are unknown."""

    name: str
    node: str
    format: str
    repeat: int
    compiler_repeat: int | None
    shape: tuple[int, ...]
    fits: bool
    agrees: bool
    macs: int | None
    hw_macs: int | None
    problems: tuple[str, ...] = ()
    hw_macs_dense: int | None = None        # the layer at R=4, input channels padded to 8
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputRow:
    """onnxruntime vs torch on one output for one input set."""

    inputs: str
    output: str
    max_abs: float
    max_rel: float          # max_abs / max|torch output|
    ok: bool


@dataclass
class CheckReport:
    """The outcome of :func:`check_onnx`; ``str()`` is a table, :meth:`to_dict` JSON-ready."""

    path: str
    onnx_checker: bool
    layers: list[LayerRow] = field(default_factory=list)
    outputs: list[OutputRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    model_macs: int | None = None
    model_hw_macs_dense: int | None = None
    model_hw_macs: int | None = None
    warnings: list[str] = field(default_factory=list)
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def max_abs(self) -> float | None:
        return max((o.max_abs for o in self.outputs), default=None)

    @property
    def max_rel(self) -> float | None:
        return max((o.max_rel for o in self.outputs), default=None)

    def totals(self) -> dict[str, Any]:
        """Whole-model MACs as ``vbxfx compress`` counts them (module docstring), and the
        sums over the annotated layers (``annotated_*``); per image, None when unknown."""
        known = all(r.macs is not None for r in self.layers)
        dense, after = self.model_hw_macs_dense, self.model_hw_macs
        return {"layers": len(self.layers), "fit": sum(r.fits for r in self.layers),
                "agree": sum(r.agrees for r in self.layers),
                "macs": self.model_macs, "hw_macs_dense": dense, "hw_macs": after,
                "macs_before": dense, "macs_after": after,
                "macs_removed": 1.0 - after / dense if dense and after is not None else None,
                "annotated_macs": sum(r.macs for r in self.layers) if known else None,
                "annotated_hw_macs": sum(r.hw_macs for r in self.layers) if known else None,
                "model_macs": self.model_macs, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "compared": len(self.outputs), "warnings": len(self.warnings)}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "onnx_checker": self.onnx_checker,
                "layers": [asdict(r) for r in self.layers],
                "outputs": [asdict(o) for o in self.outputs], "totals": self.totals(),
                "rtol": self.rtol, "atol": self.atol, "problems": list(self.problems),
                "warnings": list(self.warnings), "seconds": self.seconds}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        def num(v: Any) -> str:
            return "?" if v is None else f"{v:,}"

        head = ("layer", "node", "fmt", "R", "R*", "shape", "fits", "agrees", "MACs", "HW MACs")
        rows = [(r.name or "(root)", r.node, r.format, str(r.repeat),
                 "-" if r.compiler_repeat is None else str(r.compiler_repeat),
                 "x".join(map(str, r.shape)), "yes" if r.fits else "NO",
                 "yes" if r.agrees else "NO", num(r.macs), num(r.hw_macs)) for r in self.layers]
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [f"vbxfx check {self.path}", line(head)] + [line(r) for r in rows]
        t = self.totals()
        removed = (f": {t['macs_removed']:.1%} of the dense hardware MACs removed"
                   if t["macs_removed"] is not None else "")
        out.append(f"totals: {t['layers']} annotated layer(s), {t['fit']} fit, {t['agree']} "
                   f"agree; standard MACs {num(t['macs'])}; hardware MACs {num(t['hw_macs_dense'])}"
                   f" dense (R=4, input channels padded to 8) -> {num(t['hw_macs'])} at the "
                   f"repeats the compiler will use{removed}")
        out += [f"warning: {w}" for w in self.warnings]
        out.append(f"onnx checker: {'ok' if self.onnx_checker else 'FAILED'}")
        if self.outputs:
            out.append(f"onnxruntime vs torch: {len(self.outputs)} comparison(s), max abs "
                       f"{self.max_abs:.3g}, max rel {self.max_rel:.3g} (rtol {self.rtol:g}, "
                       f"atol {self.atol:g})")
        out += [f"problem: {p}" for p in self.problems]
        out.append("OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))")
        return "\n".join(out)


# --------------------------------------------------------------------------- the check


def check_onnx(path: str | os.PathLike, *, torch_model: torch.nn.Module | None = None,
               example_inputs: Any = None, inputs: Any = None, n_random: int = 2,
               rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
               seed: int = 0) -> CheckReport:
    """Check the annotated ONNX file at ``path`` (see the module docstring).

    Args:
        torch_model: the model the file came from; enables the numerical comparison.
        example_inputs: one input set (a Tensor or a tuple); also gives the shapes of the
            random inputs when the ONNX inputs have dynamic dimensions.
        inputs: user inputs: one set (Tensor, ndarray or tuple) or a list of sets.
        n_random: random input sets (standard normal, seeded with ``seed``).

    Raises:
        CheckError: the file or the inputs cannot be used (the message says why).
    """
    start = time.perf_counter()
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise CheckError(f"n_random must be an int >= 0, got {n_random!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise CheckError(f"{name} must be a number >= 0, got {tol!r}")
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    proto = load_onnx(path)
    report = CheckReport(where, onnx_checker=True, rtol=float(rtol), atol=float(atol))
    try:
        onnx.checker.check_model(where, full_check=True)
    except Exception as e:
        report.onnx_checker = False
        report.problems.append(f"onnx checker: {_one_line(e)}")
    nodes = annotated_nodes(proto, where)
    graph = OnnxGraph(proto)
    complete_shapes(graph)
    _check_layers(graph, nodes, report)
    report.model_macs, report.model_hw_macs_dense, report.model_hw_macs = model_macs(
        graph, [(item.node, row.hw_macs, row.hw_macs_dense)
                for item, row in zip(nodes, report.layers)])
    sets = _input_sets(inputs, example_inputs)
    from vbxfx.export.numerics import compare
    compare(where, torch_model, sets, example_inputs, n_random, seed, report)
    report.seconds = time.perf_counter() - start
    logger.info("checked %s: %s in %.1f s", where, "ok" if report.ok else
                f"{len(report.problems)} problem(s)", report.seconds)
    return report


def _check_layers(graph: OnnxGraph, nodes: list, report: CheckReport) -> None:
    for item in nodes:
        node, ann = item.node, item.annotation
        label = f"layer {ann.name!r} (node {node.name!r})"
        ref = graph.weight(node)
        shape = tuple(ann.encoding.mask.shape)
        if ref is None:
            report.problems.append(f"{label}: its weight is not a constant Conv/Gemm/MatMul "
                                   "weight; it cannot be checked")
            report.layers.append(LayerRow(ann.name, node.name, ann.fmt, ann.repeat, None, shape,
                                          False, False, None, None))
            continue
        if item.weight_input != node.input[1]:
            logger.info("%s: weight input is now %r (annotated: %r)", label, node.input[1],
                        item.weight_input)
        weight = torch.from_numpy(np.array(ref.torch_layout(), dtype=np.float32))
        verdict = verify_layer(weight, ann, label)
        problems = list(verdict.problems)
        group = int(attribute(node, "group", 1)) if node.op_type == "Conv" else 1
        if group != 1:
            problems.append(f"{label}: a grouped convolution (group={group}); the compiler "
                            "leaves it dense")
        positions = graph.output_positions(node)
        macs = hw = dense = None
        if positions is not None and tuple(weight.shape) == shape:
            macs, hw = dense_mults(shape) * positions, verdict.mults * positions
            dense = hardware_macs(shape[0], shape[1], dense_mults(shape[2:]), positions, 4)
        report.problems.extend(problems)
        report.warnings.extend(verdict.warnings)
        report.layers.append(LayerRow(ann.name, node.name, ann.fmt, ann.repeat,
                                      verdict.compiler_repeat, shape, verdict.fits and group == 1,
                                      verdict.agrees, macs, hw, tuple(problems), dense,
                                      verdict.warnings))


def _input_sets(inputs: Any, example_inputs: Any) -> list[tuple[str, tuple]]:
    """``[(label, arrays)]``: the user's sets, then the example inputs."""
    sets: list[tuple[str, tuple]] = []
    if inputs is not None:
        many = inputs if isinstance(inputs, list) else [inputs]
        for k, one in enumerate(many):
            sets.append((f"inputs[{k}]", _as_set(one, f"inputs[{k}]")))
    if example_inputs is not None:
        sets.append(("example_inputs", _as_set(example_inputs, "example_inputs")))
    return sets


def _as_set(value: Any, what: str) -> tuple:
    items = tuple(value) if isinstance(value, tuple) else (value,)
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.append(item.detach().cpu().numpy())
        elif isinstance(item, np.ndarray):
            out.append(item)
        else:
            raise CheckError(f"{what}: expected Tensors or numpy arrays, got {type(item).__name__}")
    return tuple(out)


def _one_line(e: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- command line


def add_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``vbxfx check`` to ``parser``."""
    parser.add_argument("onnx", help="the annotated .onnx file")
    parser.add_argument("--model", metavar="SPEC",
                        help="the torch model the file came from, for the onnxruntime comparison "
                             "(e.g. path/to/model.pt saved with torch.save, or file.py:factory)")
    parser.add_argument("--weights", metavar="FILE", help="a state_dict loaded on top of --model")
    parser.add_argument("--input", metavar="FILE", action="append", default=[],
                        help="an input set: .npy (single-input models) or .npz (arrays by input "
                             "name or in order); repeat for more")
    parser.add_argument("--random", type=int, default=2, metavar="N",
                        help="random input sets to compare on (default 2)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help=f"relative tolerance, of max|torch output| (default {DEFAULT_RTOL:g})")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _load_input(path: str) -> tuple:
    if not os.path.isfile(path):
        raise CheckError(f"--input {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CheckError(f"--input {path}: not a .npy/.npz file ({_one_line(e)})") from e
    if isinstance(data, np.ndarray):
        return (data,)
    with data:
        return tuple(data[k] for k in data.files)


def run_check_command(args: argparse.Namespace) -> int:
    """Run ``vbxfx check`` with parsed options; print a table (or JSON); return the exit code."""
    try:
        model = None
        if args.model:
            from vbxfx.model_spec import resolve_model
            model = resolve_model(args.model, args.weights).model
        inputs = [_load_input(p) for p in args.input] or None
        report = check_onnx(args.onnx, torch_model=model, inputs=inputs, n_random=args.random,
                            rtol=args.rtol, atol=args.atol, seed=args.seed)
    except VbxError as e:
        return _fail(args, str(e))
    except Exception as e:  # never a traceback on the command line
        logger.debug("check failed", exc_info=True)
        return _fail(args, f"{type(e).__name__}: {_one_line(e)}")
    print(report.to_json() if args.json else report)
    return 0 if report.ok else 1


def _fail(args: argparse.Namespace, message: str) -> int:
    message = " ".join(message.split())
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_code": 2, "error": message}))
    print(f"vbxfx check: error: {message}", file=sys.stderr)
    return 2


def main_check(argv: Sequence[str] | None = None) -> int:
    """``vbxfx check`` as a function: parse ``argv`` and return the exit code."""
    parser = add_check_arguments(argparse.ArgumentParser(
        prog="vbxfx check",
        description="Check an annotated ONNX file for the VectorBlox toolchain."))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line usage error
        return int(e.code or 0)
    return run_check_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_check())
