"""``vbxfx export model.onnx --tflite model.tflite``: the command line of
:func:`vbxfx.integrations.onnx2tf.convert_to_tflite` (its parser imports neither torch nor
TensorFlow)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from vbxfx.integrations.onnx2tf import (DEFAULT_CALIB, DEFAULT_ENV_DIR, ENV_ONNX2TF,
                                        ENV_TFLITE_ENV, INT8_METHODS, _MEAN_STD,
                                        convert_to_tflite)

__all__ = ["add_export_arguments", "run_export_command"]


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``vbxfx export``."""
    parser.add_argument("onnx", help="the vbxfx .onnx file (it is not modified)")
    parser.add_argument("--tflite", required=True, metavar="OUT",
                        help="write the int8 TFLite that vnnx_compile reads here, then check it")
    parser.add_argument("--calib", metavar="SPEC",
                        help="calibration: image folder, .pt/.npy tensor [N,C,H,W] "
                             f"(preprocessed), or skimage[:N] (default {DEFAULT_CALIB})")
    parser.add_argument("--normalize", choices=tuple(_MEAN_STD), default="imagenet",
                        help="preprocessing of calibration images: imagenet mean/std "
                             "(torchvision, default) or none (inputs in [0, 1], e.g. YOLO)")
    parser.add_argument("--onnx2tf", metavar="PATH",
                        help=f"the onnx2tf executable (default: ${ENV_ONNX2TF}, "
                             f"${ENV_TFLITE_ENV}/bin, PATH, ./{DEFAULT_ENV_DIR}/bin)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="keep onnx2tf's work folder (and its log) here")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing OUT (and OUT's _float32.tflite)")
    parser.add_argument("--no-float", action="store_true",
                        help="do not keep onnx2tf's float32 TFLite beside OUT "
                             "(NAME_float32.tflite, the per-layer reference of vbxfx check "
                             "--calib)")
    parser.add_argument("--int8", choices=INT8_METHODS, default="bias",
                        help="after onnx2tf: bias (default: activation ranges of least error, "
                             "then every bias corrected on the calibration data; no weight "
                             "changes), optq (also the filters rounded anew, patterns kept), "
                             "ranges (the ranges only), or converter (onnx2tf's file as it is)")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--cut-head", action="store_true",
                     help="end the int8 graph at an ultralytics Detect head's box and class "
                          "convolutions (as the VectorBlox SDK's YOLO tutorials do); the host "
                          "decodes them (vbxfx.integrations.ultralytics_head.decode_head). "
                          "Without it, pixel boxes and class probabilities share one int8 grid")
    cut.add_argument("--cut", nargs="+", metavar="TENSOR",
                     help="end the int8 graph at these ONNX tensors")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def run_export_command(args: argparse.Namespace,
                       note: Callable[[str], None] | None = None,
                       out: Callable[[str], None] | None = None) -> int:
    """Run ``vbxfx export`` with parsed options: 0 the TFLite checks, 1 it does not; errors
    (:class:`~vbxfx.errors.VbxError`) propagate to the CLI (exit 2)."""
    note = note or (lambda text: print(text, file=sys.stderr))
    out = out or print      # the CLI passes its console: with --json, stdout holds the JSON alone
    result = convert_to_tflite(args.onnx, args.tflite, calib=args.calib,
                               normalize=args.normalize, onnx2tf=args.onnx2tf,
                               force=args.force, work_dir=args.work_dir,
                               keep_float=not getattr(args, "no_float", False),
                               int8=getattr(args, "int8", "bias"), progress=note,
                               cut="detect-head" if getattr(args, "cut_head", False)
                               else getattr(args, "cut", None))
    for text in result.notes:
        note(f"note: {text}")
    if result.int8 is not None:
        note(result.int8.line())
    if args.json:
        out(json.dumps(result.to_dict(), indent=2))
    else:
        out(str(result.check))
        kept = (f" and its float32 reference {result.float_output}" if result.float_output
                else "")
        out(f"\nwrote {result.output}{kept} in {result.seconds:.0f} s"
            + ("" if result.check.ok else "  (CHECK FAILED)"))
    return 0 if result.check.ok else 1
