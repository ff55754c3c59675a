"""Keep the int8 file close to float: better activation ranges, then the filters and biases
refit to the data, written into the file the converter made.

``vbxfx export --tflite`` runs :func:`calibrate_int8` on onnx2tf's full-integer file with the
float32 file onnx2tf wrote beside it and the export's calibration data:

1. ``"ranges"``: every activation gets the int8 range of least error on the float
   activations (:mod:`vbxfx.quant.ranges`) instead of the converter's min/max; one read only
   by convolutions, the range of least error at *their* outputs
   (:mod:`vbxfx.quant.consumer_ranges`: depthwise filters amplify the rounding noise);
2. ``"bias"`` (the default, after the ranges): every CONV_2D / DEPTHWISE_CONV_2D /
   FULLY_CONNECTED layer, in graph order, has its int32 bias set so that its mean output on
   the data, with every earlier layer as int8 computes it, equals the float model's
   (empirical bias correction, :mod:`vbxfx.quant.rounding`); no int8 weight changes;
3. ``"optq"`` (after the ranges): as ``"bias"``, and the int8 filters rounded anew with the
   errors carried through the inputs' statistics (OPTQ) inside each compressed layer's
   pattern. On MobileNetV2 its KL against float was the lowest by a little, but it rewrites
   every filter and fell back with more calibration samples (BENCHMARKS.md), so it is not
   the default.

Only numbers change: scales, zero points, int8 filters, int32 biases, each written over its
own bytes. The result is kept only when the file's output on the calibration data is closer
to the float32 file's than the converter's was; otherwise the converter's file stays and the
report says so. ``vbxfx check model.tflite --model SPEC --calib DATA`` measures the outcome
on other data.

>>> report = calibrate_int8("m.tflite", "m_float32.tflite", images)    # doctest: +SKIP
>>> report.sqnr_before, report.sqnr_after                              # doctest: +SKIP
(9.3, 15.1)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vbxfx.errors import CheckError, ConfigError
from vbxfx.quant.interpreter import TfliteRunner
from vbxfx.quant.metrics import sqnr_db
from vbxfx.quant.patch import Int8File, pair_operators
from vbxfx.quant.ranges import apply_ranges, choose_ranges
from vbxfx.quant.rounding import refit_filters

__all__ = ["calibrate_int8", "CalibrationReport", "METHODS"]

logger = logging.getLogger(__name__)

#: ``converter``: onnx2tf's file as it is; ``ranges``: step 1; ``bias``: steps 1 and 2;
#: ``optq``: steps 1 and 3.
METHODS = ("bias", "optq", "ranges", "converter")


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate_int8` did; SQNRs (dB) of the file's outputs against the float32
    file's on the calibration data, before and after."""

    method: str
    kept: bool
    samples: int
    ranges_changed: int = 0
    layers_refit: int = 0
    sqnr_before: float | None = None
    sqnr_after: float | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.method == "converter":
            return "int8: the converter's ranges and rounding (--int8 converter)"
        what = {"ranges": "ranges",
                "bias": f"ranges and {self.layers_refit} biases corrected",
                "optq": f"ranges and {self.layers_refit} layers refit (OPTQ)"}[self.method]
        outcome = "kept" if self.kept else "not better: the converter's file kept"
        return (f"int8 calibration ({what}) on {self.samples} samples: output SQNR against "
                f"float32 {self.sqnr_before:.1f} -> {self.sqnr_after:.1f} dB, {outcome} "
                f"({self.seconds:.0f} s)")


def _outputs(runner: TfliteRunner, data: np.ndarray) -> np.ndarray:
    outs = runner.run(data)
    return np.concatenate([o.reshape(len(data), -1) for o in outs], axis=1)


def _check_delegate(f: Int8File) -> None:
    """Prepare the file with LiteRT's default delegate (XNNPACK), which checks every int8
    operator's quantization rules (PAD and pooling in and out alike, ...) as strict runtimes
    do; the built-in kernels that the figures use are more lenient."""
    from vbxfx.quant.interpreter import load_interpreter_class

    interpreter, _ = load_interpreter_class()
    try:
        interpreter(model_content=f.content(), num_threads=1).allocate_tensors()
    except Exception as e:   # LiteRT raises RuntimeError with the node that failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckError(f"XNNPACK refuses it ({first[:200]})") from e


def calibrate_int8(tflite: str | os.PathLike, float_tflite: str | os.PathLike, data: Any, *,
                   method: str = "bias", output: str | os.PathLike | None = None,
                   keep_filters: frozenset[int] = frozenset(),
                   progress: Callable[[str], None] | None = None) -> CalibrationReport:
    """Calibrate the int8 file ``tflite`` against ``float_tflite`` on ``data`` (module
    docstring) and write it to ``output`` (default: over ``tflite``).

    Args:
        data: calibration samples ``[N, C, H, W]`` as the file's input takes them
            (preprocessed), a numpy array or a torch tensor; a few dozen are enough.
        method: one of :data:`METHODS`.
        keep_filters: int8 operator indices whose filters must not change (layers in the
            unstructured format); their biases are still corrected.

    Raises:
        ConfigError: an unknown method or unusable data.
        CheckError: a file that cannot be read or run, or a float32 file that does not hold
            the int8 file's operators.
    """
    if method not in METHODS:
        raise ConfigError(f"int8 calibration method must be one of {METHODS}, got {method!r}")
    x = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data,
                   dtype=np.float32)
    if x.ndim < 2 or len(x) < 1 or not np.isfinite(x).all():
        raise ConfigError(f"int8 calibration needs finite samples [N, C, H, W], got shape "
                          f"{x.shape}")
    say = progress or (lambda text: None)
    t0 = time.perf_counter()
    out = os.fspath(output if output is not None else tflite)
    if method == "converter":
        if out != os.fspath(tflite):
            Int8File(tflite).save(out)
        return CalibrationReport(method, True, len(x))
    f = Int8File(tflite)
    ref = Int8File(float_tflite)
    pairs = pair_operators(f.model, ref.model)
    expected = _outputs(TfliteRunner(float_tflite), x)
    before = sqnr_db(expected, _outputs(TfliteRunner(f.path), x))
    reference = TfliteRunner(float_tflite, preserve_all=True)

    def float_values(k: int):
        reference.invoke(x[k:k + 1])
        return reference.tensor

    def float_tensor(k: int, index: int) -> np.ndarray:
        reference.invoke(x[k:k + 1])
        return reference.tensor(index)

    say(f"int8 ranges on {len(x)} samples")
    chosen = choose_ranges(f, pairs, float_values, len(x), weight=ref.constant)
    apply_ranges(f, chosen)
    layers, notes = 0, []
    if method in ("bias", "optq"):
        def int8_runner():
            runner = TfliteRunner(f.path, content=f.content(), preserve_all=True)

            def value(k: int, index: int) -> np.ndarray:
                if value.last != k:
                    runner.invoke(x[k:k + 1])
                    value.last = k
                return runner.tensor(index)
            value.last = -1
            return value

        def weight(index: int) -> np.ndarray:
            return ref.constant(index)

        def step(n: int, total: int) -> None:
            if n % 10 == 0:
                say(f"int8 {method}: layer {n + 1}/{total}")
        layers, notes = refit_filters(f, pairs, weight, int8_runner, float_tensor, len(x),
                                      progress=step, keep=frozenset(keep_filters),
                                      round_filters=method == "optq")
    try:
        after = sqnr_db(expected, _outputs(TfliteRunner(f.path, content=f.content()), x))
        _check_delegate(f)
    except CheckError as e:
        raise CheckError(f"{f.path}: the calibrated file does not run: {e}") from e
    kept = bool(after > before)
    (f if kept else Int8File(tflite)).save(out)
    report = CalibrationReport(method, kept, len(x), len(chosen), layers,
                               round(before, 2), round(after, 2),
                               round(time.perf_counter() - t0, 1), tuple(notes))
    logger.info("%s", report.line())
    return report
