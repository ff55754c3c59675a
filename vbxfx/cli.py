"""The ``vbxfx`` command line: analyze, compress, check, demo.

Exit codes: 0 success, 1 a check found a problem, 2 unusable input (bad spec, file, value).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, Iterator

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Console:
    """What the CLI says to people: results on stdout, progress on stderr."""

    def __init__(self, quiet: bool = False, json_mode: bool = False) -> None:
        self.quiet, self.json_mode = quiet, json_mode

    def out(self, text: str = "") -> None:
        if not self.json_mode:
            print(text)

    def note(self, text: str) -> None:
        if not self.quiet and not self.json_mode:
            print(text, file=sys.stderr)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Show a stage as it runs and how long it took (a spinner-free progress line)."""
        t0 = time.perf_counter()
        if not self.quiet and not self.json_mode:
            print(f"  {name} ...", end="", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException:
            if not self.quiet and not self.json_mode:
                print(" failed", file=sys.stderr)
            raise
        if not self.quiet and not self.json_mode:
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)


# ------------------------------------------------------------------------------- helpers

def _model_and_input(args: argparse.Namespace):
    import torch

    from vbxfx.errors import ConfigError
    from vbxfx.model_spec import parse_input_shape, resolve_model

    resolved = resolve_model(args.model, weights=args.weights)
    shape = parse_input_shape(args.input_shape) or resolved.input_shape
    if shape is None:
        raise ConfigError(f"{args.model}: no default input shape for this model; give --input-shape, "
                          "e.g. --input-shape 1,3,224,224")
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return resolved, example


def _calibration(args: argparse.Namespace, resolved, example):
    if not getattr(args, "calib", None):
        return None
    from vbxfx.calib import load_calibration, natural_image_crops

    spec = args.calib
    if spec == "skimage" or spec.startswith("skimage:"):
        n = int(spec.split(":", 1)[1]) if ":" in spec else 64
        return natural_image_crops(n, size=example.shape[-1], normalize=resolved.family != "ultralytics")
    return load_calibration(spec, tuple(example.shape), normalize=resolved.family != "ultralytics")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------ commands

def cmd_analyze(args: argparse.Namespace, con: _Console) -> int:
    import vbxfx

    resolved, example = _model_and_input(args)
    with con.stage(f"trace + analyze {resolved.description}"):
        table = vbxfx.analyze(resolved.model, example, exclude=tuple(args.exclude or ()))
    if args.json:
        _print_json(table.to_dict())
    else:
        con.out(str(table))
    return EXIT_OK


def _export_and_check(con: _Console, model, example, path: str):
    import vbxfx

    with con.stage(f"export ONNX -> {path}"):
        export_report = vbxfx.export_onnx(model, example, path)
    with con.stage("check (onnx checker, int8 format rules, onnxruntime vs torch)"):
        check = vbxfx.check_onnx(path, torch_model=model, example_inputs=example)
    return _as_dict(export_report), check.to_dict(), bool(check.ok), check


def _as_dict(obj: Any) -> dict:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, dict):
        return obj
    return {"repr": repr(obj)}


def cmd_compress(args: argparse.Namespace, con: _Console) -> int:
    import torch

    import vbxfx
    from vbxfx.report import format_report, plot_allocation

    resolved, example = _model_and_input(args)
    con.note(f"vbxfx compress {resolved.description}, input {tuple(example.shape)}")
    calib = None
    if args.calib:
        with con.stage(f"load calibration data {args.calib}"):
            calib = _calibration(args, resolved, example)
    with con.stage("trace, analyze, allocate, rewrite"):
        result = vbxfx.compress(resolved.model, example, compression=args.compression,
                                budget=args.budget, sensitivity=args.sensitivity,
                                json_file=args.json_file, exclude=tuple(args.exclude or ()),
                                calib_data=calib, fmt=args.fmt, allow_dense=args.allow_dense,
                                reconstruct=calib is not None and not args.no_reconstruct)
    out: dict[str, Any] = {"model": resolved.description, "report": result.report}
    con.out(format_report(result.report, max_rows=args.max_rows))
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
        try:
            plot_allocation(result.report, args.plot)
        except ImportError:
            con.note("--plot needs matplotlib: pip install 'vbxfx[plot]' (or pip install matplotlib)")
            return EXIT_USAGE
        con.note(f"plot written to {args.plot}")
    if args.json:
        _print_json(out)
    return status


def cmd_check(args: argparse.Namespace, con: _Console) -> int:
    from vbxfx.check import run_check_command

    return run_check_command(args)


def cmd_demo(args: argparse.Namespace, con: _Console) -> int:
    import torch

    import vbxfx
    from vbxfx.demo import DemoNet
    from vbxfx.report import format_report

    model = DemoNet()
    example = torch.randn(DemoNet.example_input_shape, generator=torch.Generator().manual_seed(0))
    con.note(f"vbxfx demo: DemoNet (ships with vbxfx), input {tuple(example.shape)}, "
             f"{args.compression:.2f} of hardware MACs removed")
    with con.stage("trace, analyze, allocate, rewrite"):
        result = vbxfx.compress(model, example, compression=args.compression)
    con.out(format_report(result.report))
    with contextlib.ExitStack() as stack:
        path = args.output
        if path is None:
            path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "demo.onnx")
        exp, chk, ok, check = _export_and_check(con, result.model, example, path)
        con.out("")
        con.out(str(check))
        if args.json:
            _print_json({"report": result.report, "export": exp, "check": chk})
        con.out(f"\ndemo {'OK' if ok else 'FAILED'}" + (f": wrote {path}" if args.output else ""))
    return EXIT_OK if ok else EXIT_FAILED


# -------------------------------------------------------------------------------- parser

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME | ultralytics:CFG.yaml | file.py:factory | model.pt | demo")
    p.add_argument("--weights", help="a state_dict file loaded into the model (strict)")
    p.add_argument("--input-shape", help="e.g. 1,3,224,224 (default: 224 for torchvision, 640 for ultralytics)")
    p.add_argument("--exclude", nargs="*", metavar="LAYER", help="layer names or globs to keep dense")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of tables")


def build_parser() -> argparse.ArgumentParser:
    from vbxfx import __version__

    parser = argparse.ArgumentParser(
        prog="vbxfx", description="Compress PyTorch models for the VectorBlox accelerator "
        "(1:4 / 2:4 with weight pairing), export annotated ONNX and check it.")
    parser.add_argument("--version", action="version", version=f"vbxfx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only results and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("analyze", help="per-layer shapes, MACs and eligibility")
    _add_model_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compress", help="allocate 1:4 / 2:4 per layer, rewrite, export and check")
    _add_model_args(p)
    p.add_argument("--compression", type=float, default=0.66, help="fraction of the budget removed (default 0.66)")
    p.add_argument("--budget", choices=("macs", "params"), default="macs",
                   help="what --compression counts: hardware MACs (default) or weights")
    p.add_argument("--json-file", help='per-layer levels, seed format: {"layer": 0.5 | 0.75 | "dense"}')
    p.add_argument("--sensitivity", choices=("weight", "output"), default="weight",
                   help="data-free weight error (default) or output error on --calib data")
    p.add_argument("--calib", help="calibration data: image folder, .pt/.npy tensor, or skimage[:N]")
    p.add_argument("--no-reconstruct", action="store_true",
                   help="with --calib: do not refit the kept weights to the dense outputs")
    p.add_argument("--fmt", choices=("comp", "ucomp"), default="comp", help="structured (default) or unstructured")
    p.add_argument("--allow-dense", action="store_true", help="let the allocator keep sensitive layers dense")
    p.add_argument("-o", "--output", help="write annotated ONNX here and check it")
    p.add_argument("--save", help="also torch.save the compressed model (for fine-tuning)")
    p.add_argument("--plot", help="draw the per-layer allocation to a PNG (needs matplotlib)")
    p.add_argument("--max-rows", type=int, default=None, help="limit the per-layer table")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("check", help="verify an annotated ONNX file (format rules, annotations, onnxruntime)")
    try:
        from vbxfx.check import add_check_arguments
        add_check_arguments(p)
    except ImportError:                                   # pragma: no cover - partial install
        p.add_argument("onnx")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", help="convert a vbxfx ONNX to the int8 TFLite vnnx_compile "
                       "reads (onnx2tf, on a copy) and check it")
    from vbxfx.integrations.onnx2tf import add_export_arguments, run_export_command
    add_export_arguments(p)
    p.set_defaults(func=lambda args, con: run_export_command(args, con.note))

    p = sub.add_parser("demo", help="the whole pipeline on a model that ships with vbxfx")
    p.add_argument("--compression", type=float, default=0.66)
    p.add_argument("-o", "--output", help="keep the ONNX file here (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    con = _Console(quiet=args.quiet, json_mode=getattr(args, "json", False))
    from vbxfx.errors import VbxError
    try:
        return args.func(args, con)
    except VbxError as e:
        print(f"vbxfx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"vbxfx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vbxfx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
