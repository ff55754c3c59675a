"""Run a TFLite file on NCHW float batches with a real interpreter (LiteRT), outputs in float.

:class:`TfliteRunner` wraps ``ai_edge_litert.interpreter.Interpreter`` (Google's maintained
LiteRT; ``pip install ai-edge-litert``, it sits beside numpy 2 and torch) and hides what
differs between a torch model and the file onnx2tf wrote:

* **layout**: onnx2tf turns the ``[N, C, H, W]`` input into ``[N, H, W, C]``; a batch given
  NCHW is transposed when the file's input is NHWC (kept when the file is NCHW already);
* **input quantization**: a full-integer file may take int8/uint8 input (``vbxfx export
  --tflite`` writes int8 input with the calibration's scale): values are quantized with the
  input tensor's scale and zero point, rounded and clipped as TFLite's QUANTIZE does;
* **batch**: onnx2tf writes batch 1; the batch is run one sample (one file batch) at a time;
* **outputs** are dequantized to float64 (``scale * (q - zero_point)``) and 4-D NHWC outputs
  are given back as NCHW where the caller names the shape it expects.

The file always runs on LiteRT's built-in kernels, without the XNNPACK delegate: its int8
kernels round differently (DemoNet's output SQNR moves by 0.25 dB), and the figures must
not depend on whether the intermediate tensors are kept. With ``preserve_all=True`` every
intermediate tensor is kept (``experimental_preserve_all_tensors``) and
:meth:`TfliteRunner.tensor` reads each one, dequantized, after a :meth:`TfliteRunner.invoke`.

>>> runner = TfliteRunner("model_full_integer_quant.tflite")       # doctest: +SKIP
>>> logits = runner.run(images_nchw)                               # doctest: +SKIP
>>> logits.shape                                                   # doctest: +SKIP
(256, 1000)
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np

from vbxfx.errors import CheckError

__all__ = ["TfliteRunner", "TensorInfo", "load_interpreter_class", "dequantize", "quantize"]

logger = logging.getLogger(__name__)

_INSTALL = ("running a TFLite file needs LiteRT: pip install ai-edge-litert "
            "(or pip install 'vbxfx[tflite]')")
_INTEGER = (np.int8, np.uint8, np.int16)


def load_interpreter_class():
    """``(Interpreter, OpResolverType)`` of ai-edge-litert.

    Raises:
        CheckError: ai-edge-litert is not installed (the message says how to install it).
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:
        raise CheckError(f"{_INSTALL} ({e})") from e
    return Interpreter, OpResolverType


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the interpreter sees it: ``scale``/``zero_point`` per tensor (0 when not
    quantized or quantized per channel), ``dtype`` a numpy type name."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale > 0 and self.dtype in ("int8", "uint8", "int16")

    def qrange(self) -> tuple[int, int]:
        info = np.iinfo(np.dtype(self.dtype))
        return int(info.min), int(info.max)


def dequantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float64 values of a tensor: ``scale * (q - zero_point)`` when quantized."""
    if info.quantized:
        return info.scale * (values.astype(np.float64) - info.zero_point)
    return values.astype(np.float64)


def quantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float values on the integer grid of ``info`` (round half away from zero, clip), as
    TFLite's QUANTIZE does; float tensors get float32."""
    if not info.quantized:
        return np.asarray(values, dtype=np.dtype(info.dtype))
    lo, hi = info.qrange()
    scaled = np.asarray(values, dtype=np.float64) / info.scale
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) + info.zero_point
    return np.clip(q, lo, hi).astype(np.dtype(info.dtype))


class TfliteRunner:
    """A TFLite file ready to run on ``[N, C, H, W]`` float batches (module docstring).

    Args:
        path: the ``.tflite`` file (with ``content``: the name its messages use).
        preserve_all: keep every intermediate tensor (for :meth:`tensor`).
        num_threads: interpreter threads (1 on a shared machine).
        content: the file's bytes, when they are not (yet) on disk.

    Raises:
        CheckError: the file is missing, is not a TFLite file the interpreter loads, has
            other than one input, or ai-edge-litert is not installed.
    """

    def __init__(self, path: str | os.PathLike, *, preserve_all: bool = False,
                 num_threads: int = 1, content: bytes | None = None) -> None:
        self.path = os.fspath(path)
        if content is None and not os.path.isfile(self.path):
            raise CheckError(f"{self.path}: no such TFLite file")
        interpreter, resolver = load_interpreter_class()
        # built-in kernels (module docstring): XNNPACK rounds otherwise and hides tensors
        kwargs = dict(experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        if preserve_all:
            kwargs["experimental_preserve_all_tensors"] = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")           # "intended for debugging" notice
                source = ({"model_path": self.path} if content is None
                          else {"model_content": bytes(content)})
                self._it = interpreter(num_threads=num_threads, **source, **kwargs)
            self._it.allocate_tensors()
        except Exception as e:   # LiteRT raises ValueError/RuntimeError with a long text
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckError(f"{self.path}: the TFLite interpreter cannot load it "
                             f"({type(e).__name__}: {first[:300]})") from e
        ins = self._it.get_input_details()
        if len(ins) != 1:
            raise CheckError(f"{self.path}: {len(ins)} inputs; vbxfx runs TFLite files with "
                             "one image input")
        self.input = self._info(ins[0])
        self.outputs = tuple(self._info(d) for d in self._it.get_output_details())
        self.tensors = {d["index"]: self._info(d) for d in self._it.get_tensor_details()}
        logger.debug("%s: input %s %s, %d output(s)", self.path, self.input.shape,
                     self.input.dtype, len(self.outputs))

    @staticmethod
    def _info(d: dict) -> TensorInfo:
        scale, zero = d.get("quantization", (0.0, 0))
        return TensorInfo(int(d["index"]), str(d["name"]), tuple(int(v) for v in d["shape"]),
                          np.dtype(d["dtype"]).name, float(scale), int(zero))

    # ------------------------------------------------------------------ input

    def file_layout(self, shape: tuple[int, ...]) -> str:
        """``"NHWC"`` or ``"NCHW"``: how the file takes a batch of torch shape ``shape``.

        Raises:
            CheckError: neither layout fits the file's input shape.
        """
        want = self.input.shape
        if len(shape) == 4 and len(want) == 4:
            n, c, h, w = shape
            if tuple(want[1:]) == (h, w, c):
                return "NHWC"
            if tuple(want[1:]) == (c, h, w):
                return "NCHW"
        elif len(shape) == len(want) and tuple(shape[1:]) == tuple(want[1:]):
            return "NCHW"
        raise CheckError(f"{self.path}: the file's input {self.input.name!r} has shape "
                         f"{list(want)}; data of shape {list(shape)} fits neither as NCHW nor, "
                         "transposed, as NHWC")

    def _prepare(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float batch -> the file's layout and type."""
        x = np.asarray(batch, dtype=np.float32)
        if self.file_layout(x.shape) == "NHWC" and x.ndim == 4:
            x = np.transpose(x, (0, 2, 3, 1))
        return quantize(x, self.input)

    # ------------------------------------------------------------------ running

    def invoke(self, sample: np.ndarray) -> None:
        """Run one file batch (``[file batch, C, H, W]``, NCHW float); then read tensors."""
        x = self._prepare(sample)
        if tuple(x.shape) != tuple(self.input.shape):
            raise CheckError(f"{self.path}: a batch of {x.shape[0]} was given, the file runs "
                             f"batches of {self.input.shape[0]}")
        self._it.set_tensor(self.input.index, np.ascontiguousarray(x))
        self._it.invoke()

    def tensor(self, index: int) -> np.ndarray:
        """Tensor ``index`` of the last :meth:`invoke`, dequantized to float64 (needs
        ``preserve_all`` for intermediate tensors)."""
        try:
            raw = self._it.get_tensor(index)
        except ValueError as e:
            raise CheckError(f"{self.path}: tensor {index} cannot be read ({e}); create the "
                             "runner with preserve_all=True to read intermediate tensors") from e
        return dequantize(np.array(raw), self.tensors[index])

    def run(self, data, expect_shapes: list[tuple[int, ...]] | None = None) -> list[np.ndarray]:
        """Run ``data`` (``[N, C, H, W]`` float, a numpy array or a torch tensor) sample by
        sample; returns each output ``[N, ...]`` in float64.

        ``expect_shapes`` (the torch outputs' shapes, batch included) puts 4-D NHWC outputs
        back in NCHW and swaps the last two axes of 3-D outputs where that makes them fit.
        """
        x = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data,
                       dtype=np.float32)
        step = max(1, self.input.shape[0])
        if x.ndim < 1 or x.shape[0] % step:
            raise CheckError(f"{self.path}: {x.shape[0] if x.ndim else 0} samples cannot be "
                             f"run in batches of {step}")
        outs: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, x.shape[0], step):
            self.invoke(x[start:start + step])
            for k, info in enumerate(self.outputs):
                outs[k].append(self.tensor(info.index))
        result = [np.concatenate(o, axis=0) for o in outs]
        if expect_shapes is not None:
            result = [to_torch_layout(r, s) for r, s in zip(result, expect_shapes)]
        return result


def to_torch_layout(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` in torch's layout ``shape``: as is, NHWC -> NCHW (4-D), or the last two axes
    swapped (3-D, detection heads); unchanged when none fits (the caller compares shapes)."""
    shape = tuple(shape)
    if array.shape == shape:
        return array
    if array.ndim == 4 and np.transpose(array, (0, 3, 1, 2)).shape == shape:
        return np.transpose(array, (0, 3, 1, 2))
    if array.ndim == 3 and np.swapaxes(array, 1, 2).shape == shape:
        return np.swapaxes(array, 1, 2)
    if array.size == int(np.prod(shape)) and array.ndim == 2 and len(shape) == 2:
        return array.reshape(shape)
    return array
