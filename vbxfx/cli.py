"""The ``vbxfx`` command line: analyze, compress, check, demo.

Exit codes: 0 success, 1 a check found a problem, 2 unusable input (bad spec, file, value).
Nothing heavy is imported until a command runs, so ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from typing import Any, Iterator

from vbxfx.console import Console, TqdmHandler

__all__ = ["main", "build_parser", "default_threads"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

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


def _writable(path: str | None, option: str) -> None:
    """Fail now, before minutes of work, when ``path`` cannot be written."""
    if not path:
        return
    from vbxfx.errors import ConfigError

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        name = {"-o": "model.onnx", "--save": "model.pt", "--plot": "allocation.png"}.get(option, "file")
        raise ConfigError(f"{option} {path!r} is a directory; give a file name, e.g. "
                          f"{os.path.join(path, name)!r}")
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise ConfigError(f"{option} {path!r}: folder {folder!r} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vbxfx-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{option} {path!r}: cannot write into folder {folder!r} "
                          f"({e.strerror or type(e).__name__})") from e


def _model_and_input(args: argparse.Namespace):
    from vbxfx.errors import ConfigError
    from vbxfx.model_spec import check_input_memory, parse_input_shape, resolve_model

    given = parse_input_shape(args.input_shape)
    if given is not None:
        check_input_memory(given)
    resolved = resolve_model(args.model, weights=args.weights)
    shape = given or resolved.input_shape
    if shape is None:
        raise ConfigError(f"{args.model}: no default input shape for this model; give --input-shape, "
                          "e.g. --input-shape 1,3,224,224")
    import torch
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return resolved, example


def _print_json(con: Console, obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str), file=con.stdout, flush=True)


def _as_dict(obj: Any) -> dict:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, dict):
        return obj
    return {"repr": repr(obj)}


def _export_and_check(con: Console, model, example, path: str):
    import vbxfx

    with con.stage(f"export ONNX -> {path}"):
        export_report = vbxfx.export_onnx(model, example, path)
    for name, why in getattr(export_report, "skipped", {}).items():
        con.out(f"not annotated: {name}: {why}")
    with con.stage("check (onnx checker, int8 format rules, onnxruntime vs torch)"):
        check = vbxfx.check_onnx(path, torch_model=model, example_inputs=example)
    return _as_dict(export_report), check.to_dict(), bool(check.ok), check


def _refit_line(report: dict, images: int | None) -> str | None:
    refit = report.get("reconstruct")
    if not refit:
        return None
    before, after = refit["mean_output_error"]
    on = f" on {images} calibration image(s)" if images else ""
    how = {"sequential": "layer by layer on the compressed model's inputs",
           "local": "each on the dense model's inputs: the model does not trace symbolically"}
    method = refit.get("method", "")
    return (f"refit: {refit['layers']} layer(s) refit{on}; mean relative output error "
            f"{before:.4f} -> {after:.4f} ({how.get(method, method)})")


# ------------------------------------------------------------------------------ commands

def cmd_analyze(args: argparse.Namespace, con: Console) -> int:
    import vbxfx

    resolved, example = _model_and_input(args)
    with con.stage(f"trace + analyze {resolved.description}"):
        table = vbxfx.analyze(resolved.model, example, exclude=tuple(args.exclude or ()))
    if args.json:
        _print_json(con, table.to_dict())
    else:
        con.out(str(table))
    return EXIT_OK


def cmd_compress(args: argparse.Namespace, con: Console) -> int:
    import importlib.util

    from vbxfx.errors import ConfigError

    for path, option in ((args.output, "-o"), (args.save, "--save"), (args.plot, "--plot")):
        _writable(path, option)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'vbxfx[plot]' (or pip install "
                          "matplotlib)")
    import torch

    import vbxfx
    from vbxfx.calib import calibration_from_spec
    from vbxfx.report import format_report, plot_allocation

    resolved, example = _model_and_input(args)
    con.note(f"vbxfx compress {resolved.description}, input {tuple(example.shape)}")
    calib = None
    if args.calib:
        with con.stage(f"load calibration data {args.calib}"):
            calib = calibration_from_spec(args.calib, tuple(example.shape),
                                          normalize=resolved.family != "ultralytics")
    refit = calib is not None and not args.no_reconstruct
    result = vbxfx.compress(resolved.model, example, compression=args.compression,
                            budget=args.budget, sensitivity=args.sensitivity,
                            json_file=args.json_file, exclude=tuple(args.exclude or ()),
                            calib_data=calib, fmt=args.fmt, allow_dense=args.allow_dense,
                            reconstruct=refit, progress=con.progress,
                            include_frozen=args.include_frozen)
    out: dict[str, Any] = {"model": resolved.description, "report": result.report}
    con.out(format_report(result.report, max_rows=args.max_rows))
    line = _refit_line(result.report, None if calib is None else int(calib.shape[0]))
    if line:
        con.out(line)
    elif calib is not None:
        con.note("(--no-reconstruct: the kept weights were not refit to the calibration data)")
    else:
        con.note("(add --calib skimage:64, or a folder of your images, to refit the kept "
                 "weights to the dense model's outputs)")
    status = EXIT_OK
    if args.output:
        exp, chk, ok, check = _export_and_check(con, result.model, example, args.output)
        out["export"], out["check"] = exp, chk
        con.out("")
        con.out(str(check))
        con.out(f"\nwrote {args.output}" + ("" if ok else "  (CHECK FAILED)"))
        status = EXIT_OK if ok else EXIT_FAILED
    else:
        con.note("(add -o model.onnx to export annotated ONNX and check it)")
    if args.save:
        with con.stage(f"save the compressed torch model -> {args.save}"):
            torch.save(result.model, args.save)
    if args.plot:
        plot_allocation(result.report, args.plot)
        con.note(f"plot written to {args.plot}")
    if args.json:
        _print_json(con, out)
    return status


def cmd_check(args: argparse.Namespace, con: Console) -> int:
    from vbxfx.check_command import run_check_command

    return run_check_command(args)


def cmd_annotate(args: argparse.Namespace, con: Console) -> int:
    from vbxfx.export.foreign import annotate_onnx
    from vbxfx.model_spec import resolve_model

    model = resolve_model(args.model, weights=args.weights).model
    with con.stage(f"annotate {args.onnx} -> {args.output}"):
        layers = annotate_onnx(args.onnx, model, args.output, overwrite=args.force)
    con.out(f"wrote {args.output}: {len(layers)} compressed layer(s) annotated "
            f"(check it with: vbxfx check {args.output})")
    return EXIT_OK


def cmd_yolo(args: argparse.Namespace, con: Console) -> int:
    from vbxfx.integrations.ultralytics import main as yolo_main

    return yolo_main(args.args)


def cmd_demo(args: argparse.Namespace, con: Console) -> int:
    _writable(args.output, "-o")
    import torch

    import vbxfx
    from vbxfx.demo import DemoNet
    from vbxfx.report import format_report

    model = DemoNet()
    example = torch.randn(DemoNet.example_input_shape, generator=torch.Generator().manual_seed(0))
    con.note(f"vbxfx demo: DemoNet (ships with vbxfx), input {tuple(example.shape)}, "
             f"{args.compression:.2f} of hardware MACs removed")
    result = vbxfx.compress(model, example, compression=args.compression, progress=con.progress)
    con.out(format_report(result.report))
    with contextlib.ExitStack() as stack:
        path = args.output
        if path is None:
            path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "demo.onnx")
        exp, chk, ok, check = _export_and_check(con, result.model, example, path)
        con.out("")
        con.out(str(check))
        if args.json:
            _print_json(con, {"report": result.report, "export": exp, "check": chk})
        con.out(f"\ndemo {'OK' if ok else 'FAILED'}" + (f": wrote {path}" if args.output else ""))
    if not args.output:
        con.note("(the ONNX file was temporary and is deleted: add -o demo.onnx to keep it, "
                 "then vbxfx check demo.onnx)")
    return EXIT_OK if ok else EXIT_FAILED


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
    p.add_argument("--fmt", choices=("comp", "ucomp"), default="comp", help="structured (default) or unstructured")
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
    from vbxfx.check_command import add_check_arguments
    add_check_arguments(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", parents=common, help="convert a vbxfx ONNX to the int8 TFLite "
                       "vnnx_compile reads (onnx2tf, on a copy) and check it")
    from vbxfx.integrations.onnx2tf import add_export_arguments, run_export_command
    add_export_arguments(p)
    p.set_defaults(func=lambda args, con: run_export_command(args, con.note))

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
