"""The ``vbxfx`` command line: analyze, compress, check, demo.

Exit codes: 0 success, 1 a check found a problem, 2 unusable input (bad spec, file, value).
Nothing heavy is imported until a command runs, so ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Iterator

from vbxfx.cli.commands import (cmd_analyze, cmd_annotate, cmd_check, cmd_compress, cmd_demo,
                                 cmd_yolo)
from vbxfx.cli.console import Console, TqdmHandler

__all__ = ["main", "build_parser", "default_threads"]

EXIT_USAGE = 2

logger = logging.getLogger("vbxfx.cli")


# ------------------------------------------------------------------------------- helpers

def default_threads() -> int:
    """Threads when neither ``--threads`` nor ``OMP_NUM_THREADS`` says: the CPUs this process
    may use less the current 1-minute load, at least 1 (on a shared 2-core machine torch's
    default of 2 made compress 4-5x slower; see tools/bench_threads.py)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cpus, round(cpus - load)))


def _set_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return                                   # torch already honours it
    import torch
    n = default_threads() if threads is None else threads
    torch.set_num_threads(n)
    logger.info("torch threads: %d%s", n, "" if threads else " (--threads N to choose)")


def _threads_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of threads")
    return n


# -------------------------------------------------------------------------------- parser

def _common(top: bool) -> argparse.ArgumentParser:
    """-v / -q / --threads, accepted before the command and after it."""
    p = argparse.ArgumentParser(add_help=False)
    keep = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="count", **({"default": 0} if top else keep),
                   help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", **({"default": False} if top else keep),
                   help="only results and errors")
    p.add_argument("--threads", type=_threads_arg, metavar="N", **({"default": None} if top else keep),
                   help="torch threads (default: OMP_NUM_THREADS if set, else the CPUs less the "
                        "current load, at least 1)")
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME | ultralytics:CFG.yaml | file.py:factory | "
                                 "model.pt (torch.save or an ultralytics checkpoint) | demo")
    p.add_argument("--weights", help="a state_dict file loaded into the model (strict)")
    p.add_argument("--input-shape", help="e.g. 1,3,224,224 (default: 224 for torchvision, 640 for ultralytics)")
    p.add_argument("--exclude", nargs="*", metavar="LAYER", help="layer names or globs to keep dense")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of tables")


def build_parser() -> argparse.ArgumentParser:
    from vbxfx import __version__

    parser = argparse.ArgumentParser(
        prog="vbxfx", parents=[_common(top=True)],
        description="Compress PyTorch models for the VectorBlox accelerator "
        "(1:4 / 2:4 with weight pairing), export annotated ONNX and check it.")
    parser.add_argument("--version", action="version", version=f"vbxfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = [_common(top=False)]

    p = sub.add_parser("analyze", parents=common, help="per-layer shapes, MACs and eligibility")
    _add_model_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", parents=common,
                       help="allocate 1:4 / 2:4 per layer, rewrite, export and check")
    _add_model_args(p)
    p.add_argument("--compression", type=float, default=0.66, help="fraction of the budget removed (default 0.66)")
    p.add_argument("--budget", choices=("macs", "params"), default="macs",
                   help="what --compression counts: hardware MACs (default) or weights")
    p.add_argument("--json-file", help='per-layer levels, seed format: {"layer": 0.5 | 0.75 | "dense"}')
    p.add_argument("--sensitivity", choices=("weight", "output"), default="weight",
                   help="data-free weight error (default) or output error on --calib data")
    p.add_argument("--calib", help="calibration data: image folder, .pt/.npy tensor, or "
                                   "skimage[:N] (N crops of bundled photos, default 64)")
    p.add_argument("--no-reconstruct", action="store_true",
                   help="with --calib: do not refit the kept weights to the dense outputs")
    p.add_argument("--int8-finetune", type=int, default=0, metavar="STEPS",
                   help="with --calib: then train the compressed model towards the dense one "
                        "for STEPS steps under the int8 grids the converter will use "
                        "(vbxfx.quant.finetune_int8; give a few hundred inputs or more)")
    p.add_argument("--fmt", choices=("comp", "ucomp"), default="comp", help="structured (default) or unstructured")
    p.add_argument("--methods", default="sparsity",
                   help="what may remove MACs, comma-separated: sparsity (the 1:4 / 2:4 levels, "
                        "default), channels (channel pruning), lowrank (low-rank factors); with "
                        "more than sparsity, --compression counts the whole model's dense "
                        "hardware MACs")
    p.add_argument("--allow-dense", action="store_true", help="let the allocator keep sensitive layers dense")
    p.add_argument("--include-frozen", action="store_true",
                   help="also compress layers whose weight does not train (requires_grad=False, "
                        "e.g. ultralytics' DFL conv); they stay dense by default")
    p.add_argument("-o", "--output", help="write annotated ONNX here and check it")
    p.add_argument("--save", help="also torch.save the compressed model (for fine-tuning)")
    p.add_argument("--plot", help="draw the per-layer allocation to a PNG (needs matplotlib)")
    p.add_argument("--max-rows", type=int, default=None, help="limit the per-layer table")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("check", parents=common,
                       help="verify an annotated ONNX file (format rules, annotations, onnxruntime)")
    from vbxfx.check.command import add_check_arguments
    from vbxfx.quant.command import add_int8_arguments
    add_int8_arguments(add_check_arguments(p))      # --calib: the int8 comparison
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", parents=common, help="convert a vbxfx ONNX to the int8 TFLite "
                       "vnnx_compile reads (onnx2tf, on a copy) and check it")
    from vbxfx.cli.export_command import add_export_arguments, run_export_command
    add_export_arguments(p)
    p.set_defaults(func=lambda args, con: run_export_command(
        args, con.note, lambda text: print(text, file=con.stdout, flush=True)))

    p = sub.add_parser("demo", parents=common, help="the whole pipeline on a model that ships with vbxfx")
    p.add_argument("--compression", type=float, default=0.66)
    p.add_argument("-o", "--output", help="keep the ONNX file here (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("annotate", parents=common,
                       help="add vbxfx's annotations to an ONNX file another tool exported "
                            "(yolo export), from the compressed model; writes a copy")
    p.add_argument("onnx", help="the .onnx file (left as it is)")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="the compressed model, e.g. the best.pt the compressed trainer wrote")
    p.add_argument("--weights", metavar="FILE", help="a state_dict loaded on top of --model")
    p.add_argument("-o", "--output", required=True, help="the annotated copy")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("yolo", help="train a YOLO model compressed inside the ultralytics trainer: "
                       "vbxfx yolo train model=yolov8n.pt data=D.yaml compression=0.66 ...")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="train KEY=VALUE ...",
                   help="yolo train's arguments, plus compression, budget, fmt, json_file, "
                        "exclude (comma-separated) and include_frozen")
    p.set_defaults(func=cmd_yolo)
    return parser


@contextlib.contextmanager
def _json_stdout(con: Console) -> Iterator[None]:
    """Everything written to stdout goes to stderr - Python prints, loggers that hold the
    stdout stream (ultralytics' settings banner), C code - except the console's own results,
    which go to the real stdout (a duplicate of file descriptor 1)."""
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):   # stdout is no real file (captured)
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    saved = os.dup(fd)
    real = open(saved, "w", closefd=True, encoding="utf-8")
    before = con.stdout
    os.dup2(sys.stderr.fileno(), fd)
    con.stdout = real
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        real.flush()
        sys.stdout.flush()
        os.dup2(saved, fd)
        con.stdout = before
        real.close()


@contextlib.contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """Log records through tqdm for the command's duration; the root logger's level and
    handlers are put back afterwards (main() may be called from Python, e.g. in tests)."""
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    with _logging(args):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    json_mode = bool(getattr(args, "json", False))
    con = Console(quiet=args.quiet, json_mode=json_mode)
    from vbxfx.errors import VbxError
    try:
        _set_threads(args)
        # with --json, stdout carries the JSON document alone: whatever a library prints
        # goes to stderr (the exporters' native output is caught in vbxfx.export)
        quiet_stdout = json_mode and args.command != "check"
        with _json_stdout(con) if quiet_stdout else contextlib.nullcontext():
            return args.func(args, con)
    except (VbxError, OSError) as e:
        con.end(failed=True)
        logger.debug("error", exc_info=True)
        print(f"vbxfx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        con.end(failed=True)
        print("vbxfx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
