"""The ``vbxfx`` commands: analyze, compress, check, annotate, yolo, demo.

Each ``cmd_*`` takes the parsed arguments and the :class:`~vbxfx.cli.console.Console`, prints
for people (or JSON), and returns the exit code; :mod:`vbxfx.cli.main` builds the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
from typing import Any

from vbxfx.cli.console import Console

__all__ = ["cmd_analyze", "cmd_compress", "cmd_check", "cmd_annotate", "cmd_yolo", "cmd_demo"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

logger = logging.getLogger("vbxfx.cli")


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
    from vbxfx.inputs.model_spec import check_input_memory, parse_input_shape, resolve_model

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
           "local": "each on the dense model's inputs"}
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
    steps = getattr(args, "int8_finetune", 0)
    if steps < 0 or (steps and not args.calib):
        raise ConfigError(f"--int8-finetune {steps}: give a number of steps >= 0, with --calib "
                          "DATA (the inputs it trains on)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'vbxfx[plot]' (or pip install "
                          "matplotlib)")
    import torch

    import vbxfx
    from vbxfx.inputs.calib import calibration_from_spec
    from vbxfx.cli.report import format_report, plot_allocation

    resolved, example = _model_and_input(args)
    if steps and resolved.family == "ultralytics":
        raise ConfigError(f"--int8-finetune: {resolved.description} does not trace with "
                          "torch.fx.symbolic_trace, which int8-aware fine-tuning needs; train "
                          "YOLO models in the ultralytics trainer (vbxfx yolo train)")
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
                            include_frozen=args.include_frozen, methods=args.methods)
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
    if steps:
        from vbxfx.quant.qat import finetune_int8

        with con.stage(f"int8-aware fine-tuning, {steps} steps on {calib.shape[0]} inputs"):
            tuned = finetune_int8(result.model, example, calib, teacher=resolved.model,
                                  steps=steps, progress=con.progress)
        result = result._replace(model=tuned.model)
        out["int8_finetune"] = {"steps": steps, "int8_points": tuned.int8_points,
                                "first_loss": tuned.losses[0], "last_loss": tuned.losses[-1]}
        con.out(f"int8-aware fine-tuning: {steps} steps, {tuned.int8_points} int8 activations, "
                f"distillation loss {tuned.losses[0]:.4f} -> {tuned.losses[-1]:.4f} "
                f"({tuned.seconds:.0f} s)")
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
    from vbxfx.check.command import run_check_command
    from vbxfx.quant.command import run_int8_check, wants_int8_check

    if wants_int8_check(args):          # FILE.tflite --model SPEC --calib DATA
        return run_int8_check(args)
    return run_check_command(args)


def cmd_annotate(args: argparse.Namespace, con: Console) -> int:
    from vbxfx.export.foreign import annotate_onnx
    from vbxfx.inputs.model_spec import resolve_model

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
    from vbxfx.inputs.demo import DemoNet
    from vbxfx.cli.report import format_report

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
