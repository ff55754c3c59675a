"""Size and time of the ONNX annotation payloads (mask, pair offsets, signs) per compressor.

Compresses a torchvision model with ``vbxfx.compress``, collects the raw bytes each layer's
annotation packs, and compresses them with what ``export_onnx`` uses (Huffman-only deflate)
and with zlib levels 6 (zlib's default) and 1, for comparison. Sizes are before base64.

    python tools/bench_payloads.py [--model resnet18] [--compression 0.66] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import zlib

import torch
import torchvision

import vbxfx
from vbxfx.export import annotations


def payloads(model_name: str, compression: float) -> list[bytes]:
    """The raw payload bytes ``export_onnx`` packs for ``model_name`` at ``compression``
    (read back out of the encoded annotations)."""
    model = getattr(torchvision.models, model_name)().eval()
    compressed = vbxfx.compress(model, torch.randn(1, 3, 224, 224), compression=compression).model
    _, notes = vbxfx.finalize(compressed)
    raws = []
    for name, ann in notes.items():
        props = annotations.encode_layer(ann, "weight")
        raws += [annotations._unpack(props[key], name, key)
                 for key in (annotations.K_MASK, annotations.K_OFFSET, annotations.K_SIGN)]
    return raws


COMPRESSORS = {
    "huffman-only (export_onnx)": annotations.deflate,
    "zlib level 6 (default)": lambda raw: zlib.compress(raw, 6),
    "zlib level 1": lambda raw: zlib.compress(raw, 1),
}


def main(argv: list[str] | None = None) -> list[tuple[str, float, int]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="torchvision model name")
    ap.add_argument("--compression", type=float, default=0.66)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    raws = payloads(args.model, args.compression)
    raw_size = sum(len(r) for r in raws)
    print(f"{args.model} at {args.compression:g}: {len(raws)} payloads, {raw_size / 1e6:.2f} MB raw")
    print(f"{'compressor':<28} {'seconds':>8} {'MB':>7}")
    rows = []
    for name, fn in COMPRESSORS.items():
        t0 = time.perf_counter()
        size = sum(len(fn(r)) for r in raws)
        rows.append((name, time.perf_counter() - t0, size))
        print(f"{name:<28} {rows[-1][1]:>8.2f} {size / 1e6:>7.2f}")
    return rows


if __name__ == "__main__":
    main()
