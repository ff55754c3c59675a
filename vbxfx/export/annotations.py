"""The vbxfx compression annotations inside an ONNX file: schema, encode, decode.

Schema ``vbxfx.compression/1`` (``docs/onnx_schema.md`` is the reference). The model's
``metadata_props`` hold ``vbxfx.schema``, ``vbxfx.producer`` and ``vbxfx.layers`` (JSON
``{torch fqn: onnx node name}``). Each annotated Conv/Gemm/MatMul node carries, in its own
``metadata_props``:

=========================  ====================================================================
``vbxfx.layer``            the torch layer's fully-qualified name
``vbxfx.format``           ``comp`` or ``ucomp``
``vbxfx.repeat``           ``1``/``2``/``4`` (comp), ``0`` (ucomp)
``vbxfx.shape``            the weight's torch shape ``O,I,kh,kw`` / ``O,I``, e.g. ``64,64,3,3``
``vbxfx.weight``           the node input that carries the weight
``vbxfx.mask``             nonzeros: packed bits (``bitorder="little"``) of the C-order mask
``vbxfx.pair_offset``      partner offset along the input-channel axis (0 = unpaired)
``vbxfx.pair_offset_dtype``  ``int8``, ``int16`` or ``int32`` (little-endian)
``vbxfx.pair_sign``        packed bits, 1 where the pair has opposite signs (pre-adder subtracts)
=========================  ====================================================================

Array values are ``base64(zlib.compress(raw bytes))`` of the C-order flattening over the
torch shape; decoding needs only the standard library and numpy.

>>> import torch, vbxfx
>>> w = torch.tensor([[5., 3., 3., -5., 2., 4., -4., 2.]])
>>> props = encode_layer(LayerAnnotation("fc", "comp", 2, vbxfx.encode_weight(w, 2)), "fc.weight")
>>> props["vbxfx.repeat"], props["vbxfx.shape"]
('2', '1,8')
>>> back = decode_layer(props, "node fc")
>>> torch.equal(back.encoding.pair_index, vbxfx.encode_weight(w, 2).pair_index)
True
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vbxfx.errors import CheckError, ExportError, FormatError
from vbxfx.format import PairEncoding

try:  # the library's own record of a finalized layer
    from vbxfx.modules.annotation import LayerAnnotation
except ImportError:  # pragma: no cover - only while vbxfx.modules is not installed
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class LayerAnnotation:  # type: ignore[no-redef]
        """Stand-in with the fields of ``vbxfx.modules.annotation.LayerAnnotation``."""

        name: str
        fmt: str
        repeat: int
        encoding: PairEncoding

__all__ = ["SCHEMA", "SCHEMA_NAME", "SCHEMA_VERSION", "SCHEMA_KEY", "PRODUCER_KEY", "LAYERS_KEY",
           "NODE_KEYS", "LayerAnnotation", "as_annotation", "normalize_annotations",
           "encode_layer", "decode_layer", "parse_schema"]

SCHEMA_NAME = "vbxfx.compression"
SCHEMA_VERSION = 1
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"
SCHEMA_KEY = "vbxfx.schema"
PRODUCER_KEY = "vbxfx.producer"
LAYERS_KEY = "vbxfx.layers"

K_LAYER, K_FORMAT, K_REPEAT = "vbxfx.layer", "vbxfx.format", "vbxfx.repeat"
K_SHAPE, K_WEIGHT, K_MASK = "vbxfx.shape", "vbxfx.weight", "vbxfx.mask"
K_OFFSET, K_OFFSET_DTYPE, K_SIGN = "vbxfx.pair_offset", "vbxfx.pair_offset_dtype", "vbxfx.pair_sign"
#: Every node key of schema version 1, in the order they are written.
NODE_KEYS = (K_LAYER, K_FORMAT, K_REPEAT, K_SHAPE, K_WEIGHT, K_MASK, K_OFFSET, K_OFFSET_DTYPE,
             K_SIGN)
_REPEATS = {"comp": (1, 2, 4), "ucomp": (0,)}
_OFFSET_DTYPES = {"int8": "<i1", "int16": "<i2", "int32": "<i4"}


# --------------------------------------------------------------------------- normalising


def as_annotation(name: str, value: Any) -> LayerAnnotation:
    """A LayerAnnotation from a LayerAnnotation-like object (``fmt``, ``repeat``, ``encoding``)
    or a bare :class:`PairEncoding` (format and repeat taken from it).

    Raises:
        ExportError: anything else, or a format/repeat that does not go together.
    """
    if isinstance(value, PairEncoding):
        fmt, repeat, enc = value.format, value.repeat, value
    elif all(hasattr(value, a) for a in ("fmt", "repeat", "encoding")):
        fmt, repeat, enc = value.fmt, value.repeat, value.encoding
        name = getattr(value, "name", name) or name
    else:
        raise ExportError(f"annotation for layer {name!r} must be a LayerAnnotation (name, fmt, "
                          f"repeat, encoding) or a PairEncoding, got {type(value).__name__}")
    if not isinstance(enc, PairEncoding):
        raise ExportError(f"annotation for layer {name!r}: encoding must be a PairEncoding, "
                          f"got {type(enc).__name__}")
    if fmt not in _REPEATS or repeat not in _REPEATS[fmt]:
        raise ExportError(f"annotation for layer {name!r}: format {fmt!r} with repeat {repeat!r} "
                          f"is not accepted (comp: 1, 2 or 4; ucomp: 0)")
    try:
        return LayerAnnotation(name, fmt, int(repeat), enc)
    except FormatError as e:
        raise ExportError(f"annotation for layer {name!r}: {e}") from e


def normalize_annotations(annotations: Mapping[str, Any]) -> dict[str, LayerAnnotation]:
    """``{fqn: LayerAnnotation}`` from a mapping of LayerAnnotation-likes (:func:`as_annotation`)."""
    if not isinstance(annotations, Mapping):
        raise ExportError(f"annotations must be a dict {{layer fqn: LayerAnnotation}}, got "
                          f"{type(annotations).__name__}")
    out = {}
    for key, value in annotations.items():
        ann = as_annotation(str(key), value)
        if ann.name != key:
            raise ExportError(f"annotations[{key!r}] is for layer {ann.name!r}; key and name "
                              "must be the same fully-qualified name")
        out[key] = ann
    return out


# --------------------------------------------------------------------------- encoding


def deflate(raw: bytes) -> bytes:
    """A zlib stream of ``raw``, Huffman-only: any zlib reader decodes it as it decodes
    ``zlib.compress(raw)``. On these arrays (near-random mask/sign bits, offsets from a few
    values) string matching finds next to nothing, so zlib's default level 6 takes more than
    10x the time for a slightly larger result (``python tools/bench_payloads.py``: resnet18
    at 0.66, 14.6 MB raw -> 5.34 MB in 0.10 s; level 6 5.42 MB in 1.34 s)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return packer.compress(raw) + packer.flush()


def _pack(raw: bytes) -> str:
    """``base64(deflate(raw))``."""
    return base64.b64encode(deflate(raw)).decode("ascii")


def _unpack(text: str, where: str, key: str) -> bytes:
    try:
        return zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (binascii.Error, zlib.error, UnicodeEncodeError, ValueError) as e:
        raise CheckError(f"{where}: {key} is not base64 of zlib data ({e})") from e


def _stride(shape: tuple[int, ...]) -> int:
    """Flat-index distance between neighbouring input channels (torch layout)."""
    return math.prod(shape[2:]) if len(shape) == 4 else 1


def encode_layer(ann: LayerAnnotation, weight_input: str) -> dict[str, str]:
    """The node ``metadata_props`` of one annotated layer (see the module docstring).

    Raises:
        ExportError: the encoding's tensors disagree in shape, or a pair crosses an
            input-channel vector (different output channel or kernel position).
    """
    enc = ann.encoding
    shape = tuple(enc.mask.shape)
    if len(shape) not in (2, 4) or tuple(enc.pair_index.shape) != shape \
            or tuple(enc.pair_sign.shape) != shape:
        raise ExportError(f"layer {ann.name!r}: mask {tuple(enc.mask.shape)}, pair_index "
                          f"{tuple(enc.pair_index.shape)} and pair_sign "
                          f"{tuple(enc.pair_sign.shape)} must share one [O,I] or [O,I,kh,kw] shape")
    index = enc.pair_index.detach().cpu().reshape(-1).numpy()
    # only the paired weights need work: the others have offset 0
    pos = np.flatnonzero(index >= 0)
    partner = index[pos].astype(np.int64, copy=False)
    stride = _stride(shape)
    delta = partner - pos
    per_vector = stride * shape[1]
    bad = (delta % stride != 0) | (partner // per_vector != pos // per_vector)
    if bad.any():
        first = int(np.argmax(bad))
        raise ExportError(f"layer {ann.name!r}: weight {int(pos[first])} is paired with weight "
                          f"{int(partner[first])}, which is not in its input-channel vector")
    offset = delta // stride
    reach = int(np.abs(offset).max()) if offset.size else 0
    dtype = "int8" if reach <= 127 else "int16" if reach <= 32767 else "int32"
    offsets = np.zeros(index.size, dtype=_OFFSET_DTYPES[dtype])
    offsets[pos] = offset
    mask = enc.mask.detach().cpu().reshape(-1).numpy().astype(bool, copy=False)
    opposite = np.zeros(index.size, dtype=bool)
    opposite[pos] = enc.pair_sign.detach().cpu().reshape(-1).numpy()[pos] < 0
    return {
        K_LAYER: ann.name,
        K_FORMAT: ann.fmt,
        K_REPEAT: str(int(ann.repeat)),
        K_SHAPE: ",".join(str(int(d)) for d in shape),
        K_WEIGHT: weight_input,
        K_MASK: _pack(np.packbits(mask, bitorder="little").tobytes()),
        K_OFFSET: _pack(offsets.tobytes()),
        K_OFFSET_DTYPE: dtype,
        K_SIGN: _pack(np.packbits(opposite, bitorder="little").tobytes()),
    }


# --------------------------------------------------------------------------- decoding


def parse_schema(value: str | None, where: str) -> int:
    """The version of a ``vbxfx.schema`` value; CheckError when missing, foreign or newer."""
    if value is None:
        raise CheckError(f"{where} has no vbxfx annotations (no {SCHEMA_KEY!r} in the model "
                         "metadata); export it with vbxfx.export_onnx")
    m = re.fullmatch(re.escape(SCHEMA_NAME) + r"/(\d+)", value.strip())
    if not m:
        raise CheckError(f"{where}: {SCHEMA_KEY} is {value!r}; accepted is {SCHEMA!r}")
    version = int(m.group(1))
    if version > SCHEMA_VERSION:
        raise CheckError(f"{where} was written with annotation schema {value!r}, newer than this "
                         f"vbxfx reads ({SCHEMA!r}); upgrade vbxfx")
    if version < 1:
        raise CheckError(f"{where}: unknown annotation schema version {value!r}")
    return version


def _bits(props: Mapping[str, str], key: str, n: int, where: str) -> np.ndarray:
    raw = np.frombuffer(_unpack(props[key], where, key), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise CheckError(f"{where}: {key} holds {raw.size} bytes, {(n + 7) // 8} expected for "
                         f"{n} weights")
    return np.unpackbits(raw, count=n, bitorder="little").astype(bool)


def decode_layer(props: Mapping[str, str], where: str) -> LayerAnnotation:
    """The LayerAnnotation stored in one node's ``metadata_props`` (tensors on the CPU).

    Raises:
        CheckError: a key is missing or malformed; ``where`` names the node in the message.
    """
    missing = [k for k in NODE_KEYS if k not in props]
    if missing:
        raise CheckError(f"{where}: annotation keys missing: {', '.join(missing)}")
    name, fmt = props[K_LAYER], props[K_FORMAT]
    where = f"{where} (layer {name!r})"
    try:
        repeat = int(props[K_REPEAT])
        shape = tuple(int(d) for d in props[K_SHAPE].split(","))
    except ValueError as e:
        raise CheckError(f"{where}: bad {K_REPEAT} {props[K_REPEAT]!r} or {K_SHAPE} "
                         f"{props[K_SHAPE]!r}") from e
    if fmt not in _REPEATS or repeat not in _REPEATS[fmt]:
        raise CheckError(f"{where}: format {fmt!r} with repeat {repeat} is not accepted "
                         "(comp: 1, 2 or 4; ucomp: 0)")
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise CheckError(f"{where}: {K_SHAPE} {props[K_SHAPE]!r} is not [O,I] or [O,I,kh,kw]")
    dtype = props[K_OFFSET_DTYPE]
    if dtype not in _OFFSET_DTYPES:
        raise CheckError(f"{where}: {K_OFFSET_DTYPE} {dtype!r} is not one of "
                         f"{tuple(_OFFSET_DTYPES)}")
    n = math.prod(shape)
    mask = _bits(props, K_MASK, n, where)
    opposite = _bits(props, K_SIGN, n, where)
    raw = _unpack(props[K_OFFSET], where, K_OFFSET)
    offset = np.frombuffer(raw, dtype=_OFFSET_DTYPES[dtype]).astype(np.int64)
    if offset.size != n:
        raise CheckError(f"{where}: {K_OFFSET} holds {offset.size} offsets, {n} expected")
    stride = _stride(shape)
    channel = (np.arange(n) // stride) % shape[1]
    if ((channel + offset < 0) | (channel + offset >= shape[1])).any():
        raise CheckError(f"{where}: {K_OFFSET} points outside the input channels")
    paired = offset != 0
    index = np.where(paired, np.arange(n) + offset * stride, -1)
    sign = np.where(paired, np.where(opposite, -1, 1), 0).astype(np.int8)
    enc = PairEncoding(repeat=repeat, mask=torch.from_numpy(mask.reshape(shape).copy()),
                       pair_index=torch.from_numpy(index.reshape(shape)),
                       pair_sign=torch.from_numpy(sign.reshape(shape)), format=fmt)
    try:
        return LayerAnnotation(name, fmt, repeat, enc)
    except FormatError as e:
        raise CheckError(f"{where}: {e}") from e


def layers_index(value: str | None, where: str) -> dict[str, str]:
    """The model-level ``vbxfx.layers`` map ``{fqn: node name}``."""
    if value is None:
        raise CheckError(f"{where}: model metadata has {SCHEMA_KEY} but no {LAYERS_KEY!r}")
    try:
        index = json.loads(value)
    except json.JSONDecodeError as e:
        raise CheckError(f"{where}: {LAYERS_KEY} is not JSON ({e})") from e
    if not isinstance(index, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in index.items()):
        raise CheckError(f"{where}: {LAYERS_KEY} must be a JSON object {{fqn: node name}}")
    return index
