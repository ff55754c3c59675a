"""``vbxfx check model.tflite --model SPEC --calib DATA``: the command line of
:func:`vbxfx.quant.compare_int8`.

Imports neither torch nor LiteRT until it runs (``vbxfx --help`` stays fast). Exit codes: 0
when the comparison ran, 2 for unusable input (one line ``vbxfx check: error: ...``).

>>> from vbxfx.cli import main                                                  # doctest: +SKIP
>>> main(["check", "m.tflite", "--model", "torchvision:mobilenet_v2",
...       "--weights", "w.pth", "--calib", "skimage:256"])                      # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

__all__ = ["add_int8_arguments", "wants_int8_check", "run_int8_check"]

logger = logging.getLogger(__name__)


def add_int8_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the int8 comparison (``vbxfx check FILE.tflite --calib DATA``)."""
    parser.add_argument("--calib", metavar="DATA",
                        help="TFLite files: run the int8 file and the float --model on this "
                             "data and compare them (top-1 agreement, KL, SQNR, where int8 "
                             "error enters, layer by layer): an image folder, .pt/.npy "
                             "[N,C,H,W] (preprocessed), or skimage[:N]")
    parser.add_argument("--normalize", choices=("imagenet", "none"), default="imagenet",
                        help="with --calib: preprocessing of images and skimage crops, as "
                             "given to vbxfx export --tflite (default imagenet)")
    parser.add_argument("--reference", metavar="FILE",
                        help="with --calib: the float32 TFLite of the same graph for the "
                             "per-layer table (default: NAME_float32.tflite beside the file, "
                             "which vbxfx export --tflite writes)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="with --calib: use at most N samples")
    return parser


def wants_int8_check(args: argparse.Namespace) -> bool:
    """Whether the parsed options ask for the int8 comparison."""
    return bool(getattr(args, "calib", None))


def run_int8_check(args: argparse.Namespace) -> int:
    """Run the comparison for ``vbxfx check FILE.tflite --model SPEC --calib DATA``; print the
    report (or JSON); return the exit code."""
    from vbxfx.check.command import _fail, is_tflite_path
    from vbxfx.errors import VbxError

    if not is_tflite_path(args.onnx):
        return _fail(args, f"--calib applies to .tflite files (the int8 comparison); "
                           f"{args.onnx} is not one: for an ONNX file give --input FILE or "
                           "--random N")
    if not getattr(args, "model", None):
        return _fail(args, "--calib needs --model SPEC: the float torch model the TFLite file "
                           "was made from (e.g. torchvision:mobilenet_v2 --weights FILE, or "
                           "the .pt that vbxfx compress --save wrote)")
    other = [flag for flag, value in (("--expect", getattr(args, "expect", None)),
                                      ("--input", getattr(args, "input", None))) if value]
    if other:
        return _fail(args, f"{', '.join(other)} cannot be combined with --calib; run vbxfx "
                           "check FILE.tflite --expect FILE on its own for the repeats")
    if args.limit is not None and args.limit < 1:
        return _fail(args, f"--limit {args.limit}: give a positive number of samples")
    if not getattr(args, "json", False) and not getattr(args, "quiet", False):
        print(f"  running {args.onnx} and {args.model} on {args.calib} ...", file=sys.stderr,
              flush=True)
    try:
        from vbxfx.quant.analyze import compare_int8
        report = compare_int8(args.onnx, args.model, args.calib, weights=args.weights,
                              reference=args.reference, normalize=args.normalize,
                              limit=args.limit)
    except VbxError as e:
        return _fail(args, str(e))
    except Exception as e:  # never a traceback on the command line
        logger.debug("int8 comparison failed", exc_info=True)
        first = str(e).splitlines()[0] if str(e) else ""
        return _fail(args, f"{type(e).__name__}: {first}")
    print(json.dumps(report.to_dict(), indent=2) if getattr(args, "json", False) else report)
    return 0
