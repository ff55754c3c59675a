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

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from vbxfx.errors import CheckError
from vbxfx.errors import one_line as _one_line
from vbxfx.export.graph import OnnxGraph, attribute
from vbxfx.export.reader import annotated_nodes, load_onnx
from vbxfx.export.foreign import foreign_nodes, has_annotations
from vbxfx.export.numerics import OutputRow
from vbxfx.export.verify import dense_mults, verify_layer
from vbxfx.export.macs import complete_shapes, model_macs
from vbxfx.format.cost import hardware_macs
from vbxfx.model_state import float_dtype, require_real_tensors
from vbxfx.check.tolerances import TOLERANCES, tolerances_for

__all__ = ["check_onnx", "CheckReport", "LayerRow", "OutputRow", "DEFAULT_RTOL", "DEFAULT_ATOL"]

logger = logging.getLogger(__name__)

#: Tolerances of the numerical comparison (``atol + rtol * max|torch output|``) for a float32
#: torch model; other dtypes get theirs from :data:`vbxfx.check.tolerances.TOLERANCES`.
DEFAULT_RTOL, DEFAULT_ATOL = TOLERANCES["float32"]


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


@dataclass
class CheckReport:
    """The outcome of :func:`check_onnx`; ``str()`` is a table, :meth:`to_dict` JSON-ready."""

    path: str
    onnx_checker: bool
    layers: list[LayerRow] = field(default_factory=list)
    outputs: list[OutputRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_macs: int | None = None
    model_hw_macs_dense: int | None = None
    model_hw_macs: int | None = None
    warnings: list[str] = field(default_factory=list)
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    seconds: float = 0.0
    #: why onnxruntime was not compared with torch (None when it was)
    not_compared: str | None = None

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
                "notes": list(self.notes), "warnings": list(self.warnings),
                "not_compared": self.not_compared, "seconds": self.seconds}

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
        elif self.not_compared:
            out.append(f"onnxruntime vs torch: not compared ({self.not_compared})")
        out += [f"note: {n}" for n in self.notes]
        out += [f"problem: {p}" for p in self.problems]
        out.append("OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))")
        return "\n".join(out)


# --------------------------------------------------------------------------- the check


def check_onnx(path: str | os.PathLike, *, torch_model: torch.nn.Module | None = None,
               example_inputs: Any = None, inputs: Any = None, n_random: int = 2,
               rtol: float | None = None, atol: float | None = None,
               seed: int = 0, layers: Any = None) -> CheckReport:
    """Check the annotated ONNX file at ``path`` (see the module docstring).

    Args:
        torch_model: the model the file came from; enables the numerical comparison.
        example_inputs: one input set (a Tensor, or a tuple or list of Tensors); also gives
            the shapes of the random inputs when the ONNX inputs have dynamic dimensions.
        inputs: user inputs: one set (Tensor, ndarray or tuple) or a list of sets.
        n_random: random input sets (standard normal, seeded with ``seed``).
        rtol, atol: tolerances; None takes those of the torch model's dtype
            (:data:`vbxfx.check.tolerances.TOLERANCES`: 1e-5 / 1e-6 for float32, 1e-2 / 1e-5 for
            float16).
        layers: for a file without annotations (exported by another tool, e.g. ``yolo
            export``): a layers file or mapping (see :mod:`vbxfx.export.foreign`); with
            ``torch_model`` alone its compressed layers are the declared ones.

    Raises:
        CheckError: the file, the torch model (e.g. on the meta device) or the inputs cannot
            be used (the message says why).
    """
    start = time.perf_counter()
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise CheckError(f"n_random must be an int >= 0, got {n_random!r}")
    if torch_model is not None and not isinstance(torch_model, torch.nn.Module):
        raise CheckError(f"torch_model must be an nn.Module, got {type(torch_model).__name__}")
    if torch_model is not None:
        require_real_tensors(torch_model, "check_onnx", CheckError)
    dtype_rtol, dtype_atol = tolerances_for(float_dtype(torch_model) if torch_model is not None
                                            else torch.float32)
    rtol = dtype_rtol if rtol is None else rtol
    atol = dtype_atol if atol is None else atol
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
    foreign = not has_annotations(proto)
    if foreign:
        nodes = foreign_nodes(proto, where, model=torch_model, layers=layers,
                              problems=report.problems)
        report.notes.append("the file has no vbxfx annotations: its layers were matched to "
                            + ("the compressed torch model" if torch_model is not None
                               else "the layers file") + " by module path, shape and weights")
    else:
        nodes = annotated_nodes(proto, where)
    graph = OnnxGraph(proto)
    complete_shapes(graph)
    _check_layers(graph, nodes, report)
    if foreign and torch_model is None:
        # encodings derived from the file itself: only the fit to the declared repeat counts
        report.problems = [p for p in report.problems if "annotation disagrees" not in p]
    report.model_macs, report.model_hw_macs_dense, report.model_hw_macs = model_macs(
        graph, [(item.node, row.hw_macs, row.hw_macs_dense)
                for item, row in zip(nodes, report.layers)])
    sets = _input_sets(inputs, example_inputs)
    if torch_model is not None and float_dtype(torch_model) != torch.float32:
        sets = _in_file_dtype(sets, float_dtype(torch_model))
    from vbxfx.export.numerics import compare
    skipped = None
    if foreign and torch_model is not None and not _same_outputs(where, torch_model, proto):
        skipped = ("the file's outputs are not the torch model's: an exporter's inference head, "
                   "e.g. yolo export")
        torch_model = None
    compare(where, torch_model, sets, example_inputs, n_random, seed, report)
    if torch_model is None:
        report.not_compared = skipped or "no torch model given"
    elif not report.outputs and not report.problems:
        report.not_compared = "no input set: give inputs, example_inputs or n_random > 0"
    elif not all(o.ok for o in report.outputs) or not report.outputs:
        hint = _weights_hint(graph, nodes, torch_model)
        if hint:
            report.problems.append(hint)
    report.seconds = time.perf_counter() - start
    logger.info("checked %s: %s in %.1f s", where, "ok" if report.ok else
                f"{len(report.problems)} problem(s)", report.seconds)
    return report


def _same_outputs(where: str, model: torch.nn.Module, proto: onnx.ModelProto) -> bool:
    """Whether the torch model returns what the file does (count and shapes), on zeros of the
    file's input shapes; False when that cannot be told."""
    from vbxfx.export.numerics import run_torch, runnable

    try:
        arrays = []
        for value in proto.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else 1
                    for d in value.type.tensor_type.shape.dim]
            arrays.append(np.zeros(dims, dtype=np.float32))
        outs = run_torch(runnable(model), tuple(arrays))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compare"
        logger.info("%s: the torch model does not run on the file's inputs (%s)", where, e)
        return False
    want = [[d.dim_value if d.HasField("dim_value") else None
             for d in v.type.tensor_type.shape.dim] for v in proto.graph.output]
    return len(outs) == len(want) and all(
        len(o.shape) == len(w) and all(x is None or x == y for x, y in zip(w, o.shape))
        for o, w in zip(outs, want))


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


def _weights_hint(graph: OnnxGraph, nodes: list, torch_model: torch.nn.Module) -> str | None:
    """A problem line when the torch model's layers do not hold the file's weights (a fresh
    model, or the dense one), else None: then a numerical mismatch is no surprise."""
    from vbxfx.export.mapping import proportional
    from vbxfx.modules import is_compressed

    differ, compared = [], 0
    for item in nodes:
        ref = graph.weight(item.node)
        try:
            layer = torch_model.get_submodule(item.annotation.name)
        except AttributeError:
            continue
        w = layer.compressed_weight() if is_compressed(layer) else getattr(layer, "weight", None)
        if ref is None or not isinstance(w, torch.Tensor):
            continue
        compared += 1
        w = w.detach().to(torch.float32).cpu().numpy()
        if not proportional(w, np.asarray(ref.torch_layout(), np.float32), tol=1e-3):
            differ.append(item.annotation.name)
    if not differ:
        return None
    return (f"the torch model's weights are not the exported ones ({len(differ)} of {compared} "
            f"annotated layer(s) differ, e.g. {differ[0]!r}), so its outputs cannot match: "
            "compare with the compressed model the file was exported from (on the command line: "
            "--model model.pt as saved by vbxfx compress --save, or --weights with its "
            "state_dict)")


def _input_sets(inputs: Any, example_inputs: Any) -> list[tuple[str, tuple]]:
    """``[(label, arrays)]``: the user's sets, then the example inputs."""
    sets: list[tuple[str, tuple]] = []
    if inputs is not None:
        many = inputs if isinstance(inputs, list) else [inputs]
        for k, one in enumerate(many):
            sets.append((f"inputs[{k}]", _as_set(one, f"inputs[{k}]")))
    if example_inputs is not None:
        if isinstance(example_inputs, list):   # one set, as compress and export_onnx take it
            example_inputs = tuple(example_inputs)
        sets.append(("example_inputs", _as_set(example_inputs, "example_inputs")))
    return sets


def _in_file_dtype(sets: list[tuple[str, tuple]], dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """Inputs given in the torch model's dtype (float16, float64) as float32, the file's."""
    name = str(dtype).removeprefix("torch.")
    same = (lambda a: a.dtype == np.float32) if name == "bfloat16" else \
        (lambda a: a.dtype.name == name)
    return [(label, tuple(a.astype(np.float32) if same(a) else a for a in arrays))
            for label, arrays in sets]


def _as_set(value: Any, what: str) -> tuple:
    items = tuple(value) if isinstance(value, tuple) else (value,)
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu()
            out.append((item.float() if item.dtype == torch.bfloat16 else item).numpy())
        elif isinstance(item, np.ndarray):
            out.append(item)
        else:
            raise CheckError(f"{what}: expected Tensors or numpy arrays, got {type(item).__name__}")
    return tuple(out)
