"""``vbxfx check``: the command line of :func:`vbxfx.check_onnx`.

Kept apart from :mod:`vbxfx.check` so that building the parser (``vbxfx --help``) imports
neither torch nor onnx. Exit codes: 0 when everything holds, 1 when something does not,
2 for unusable input (one line ``vbxfx check: error: ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from vbxfx.check.tolerances import TOLERANCES
from vbxfx.errors import VbxError

__all__ = ["add_check_arguments", "run_check_command", "main_check", "is_tflite_path",
           "run_tflite_check"]

logger = logging.getLogger(__name__)

_TOL_HELP = ", ".join(f"{r:g} for {name}" for name, (r, _) in TOLERANCES.items())


def add_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``vbxfx check`` to ``parser``."""
    parser.add_argument("onnx", help="the annotated .onnx file, or an int8 .tflite file")
    parser.add_argument("--expect", metavar="FILE",
                        help="TFLite files: what vbxfx declared (the vbxfx .onnx, a compress "
                             "--json report, or a compressed torch .pt); each layer's repeat "
                             "is compared with it")
    parser.add_argument("--model", metavar="SPEC",
                        help="the compressed torch model the file came from, for the onnxruntime "
                             "comparison (e.g. the model.pt that vbxfx compress --save wrote, or "
                             "file.py:factory); without it onnxruntime runs but is not compared")
    parser.add_argument("--weights", metavar="FILE", help="a state_dict loaded on top of --model")
    parser.add_argument("--layers", metavar="FILE",
                        help="for an ONNX file another tool exported (yolo export): the JSON "
                             "report of `vbxfx compress --json`, or {layer: repeat}, to check it "
                             "against (--model with the compressed model does the same, its "
                             "weights included)")
    parser.add_argument("--input", metavar="FILE", action="append", default=[],
                        help="an input set: .npy (single-input models) or .npz (arrays by input "
                             "name or in order); repeat for more")
    parser.add_argument("--random", type=int, default=2, metavar="N",
                        help="random input sets to compare on (default 2)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative tolerance, of max|torch output| (default by the torch "
                             f"model's dtype: {_TOL_HELP})")
    parser.add_argument("--atol", type=float, default=None,
                        help="absolute tolerance (default by dtype: "
                             f"{TOLERANCES['float32'][1]:g} for float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _load_input(path: str) -> tuple:
    import numpy as np

    from vbxfx.errors import CheckError
    from vbxfx.errors import one_line as _one_line

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
    if is_tflite_path(args.onnx):
        return run_tflite_check(args)
    if getattr(args, "expect", None):
        return _fail(args, "--expect applies to .tflite files; an ONNX file carries its own "
                           "annotations (or give --model / --layers for one another tool wrote)")
    try:
        from vbxfx.check.onnx_check import check_onnx
        from vbxfx.errors import one_line as _one_line
        model = None
        if args.model:
            from vbxfx.inputs.model_spec import resolve_model
            model = resolve_model(args.model, args.weights).model
        elif args.weights:
            return _fail(args, "--weights needs --model SPEC (the architecture to load them into)")
        inputs = [_load_input(p) for p in args.input] or None
        report = check_onnx(args.onnx, torch_model=model, inputs=inputs, n_random=args.random,
                            rtol=args.rtol, atol=args.atol, seed=args.seed,
                            layers=getattr(args, "layers", None))
    except VbxError as e:
        return _fail(args, str(e))
    except Exception as e:  # never a traceback on the command line
        logger.debug("check failed", exc_info=True)
        return _fail(args, f"{type(e).__name__}: {_one_line(e)}")
    if args.json:
        print(report.to_json())
    else:
        print(report)
        if model is None and not (report.not_compared or "").startswith("the file's outputs"):
            print("(add --model SPEC to compare onnxruntime with the torch model: the compressed "
                  "model saved with vbxfx compress --save, or an architecture with --weights)",
                  file=sys.stderr)
    return 0 if report.ok else 1


def _fail(args: argparse.Namespace, message: str) -> int:
    message = " ".join(message.split())
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "exit_code": 2, "error": message}))
    print(f"vbxfx check: error: {message}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- TFLite files


def is_tflite_path(path: str) -> bool:
    """Whether ``vbxfx check PATH`` should treat PATH as a TFLite file: its bytes say so
    (``TFL3`` at byte 4), or its name ends in ``.tflite``."""
    from vbxfx.export.tflite_reader import is_tflite

    return is_tflite(path) or str(path).lower().endswith(".tflite")


def run_tflite_check(args: argparse.Namespace) -> int:
    """``vbxfx check FILE.tflite [--expect FILE] [--json]``: print the report, return 0/1/2."""
    from vbxfx.check.tflite_check import check_tflite

    onnx_only = [flag for flag, value in (("--model", getattr(args, "model", None)),
                                          ("--weights", getattr(args, "weights", None)),
                                          ("--input", getattr(args, "input", None)))
                 if value]
    if onnx_only:
        return _fail(args, f"{', '.join(onnx_only)} appl{'y' if len(onnx_only) > 1 else 'ies'} "
                           "to ONNX files; for a TFLite file give --expect FILE, or --model "
                           "SPEC --calib DATA to run it against the float model")
    if not getattr(args, "json", False) and not getattr(args, "quiet", False):
        print(f"  checking the int8 filters of {args.onnx} ...", file=sys.stderr, flush=True)
    try:
        report = check_tflite(args.onnx, expect=getattr(args, "expect", None))
    except VbxError as e:
        return _fail(args, str(e))
    except Exception as e:  # never a traceback on the command line
        logger.debug("check failed", exc_info=True)
        return _fail(args, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(report.to_json() if getattr(args, "json", False) else report)
    return 0 if report.ok else 1




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
