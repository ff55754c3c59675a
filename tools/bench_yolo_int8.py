"""Benchmark: mAP of yolov8n's int8 TFLite file against the float model it was made from.

yolov8n.yaml is trained here by ultralytics on a generated two-class detection set
(tools/yolo_data.py), dense and compressed (``compressed_trainer``, fine-tuned from the dense
best.pt as users do). Each best.pt then takes the README's path to the file ``vnnx_compile``
reads: ``yolo export format=onnx``, ``vbxfx annotate``, onnx2tf full-integer int8 calibrated
on the training images (``int8="converter"``) with the graph cut at the Detect head's
convolutions (``cut="detect-head"``; the host decodes them), then
:func:`vbxfx.quant.calibrate_int8` per method. One more row converts the whole graph, as
``yolo export`` wrote it, for comparison. ultralytics' own validator measures every variant on the same validation images: the
float model as it is, and the int8 file run by LiteRT in the model's place (its output put
back in torch's layout; NMS and matching are ultralytics'). Also ``check_tflite --expect``:
every declared repeat holds in the int8 filters.

    YOLO_OFFLINE=1 OMP_NUM_THREADS=1 VBXFX_TFLITE_ENV=.venv-tflite \\
        python tools/bench_yolo_int8.py --images 256 --val 64 --imgsz 64 --epochs 40 \\
        --methods converter ranges bias

Needs the converter environment (``bash tools/setup_tflite_env.sh .venv-tflite``) and
ai-edge-litert. Prints a table; ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_table import print_rows  # noqa: E402
from yolo_data import make_detection_set, offline_ultralytics  # noqa: E402

METHODS = ("converter", "ranges", "bias", "optq")


def _train(root: Path, data: Path, name: str, args, model: str, trainer=None,
           epochs: int | None = None, **extra) -> Path:
    """Train ``model`` with ultralytics (``extra``: more ``train()`` arguments)."""
    from ultralytics import YOLO

    t0 = time.perf_counter()
    YOLO(model).train(data=str(data), project=str(root / "runs"), name=name,
                      epochs=epochs or args.epochs, imgsz=args.imgsz, batch=args.batch,
                      workers=0, plots=False, device="cpu", amp=False, verbose=False,
                      exist_ok=True, seed=0, trainer=trainer, **extra)
    print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return root / "runs" / name / "weights" / "best.pt"


def _val(model, data: Path, args) -> dict:
    metrics = model.val(data=str(data), imgsz=args.imgsz, batch=args.batch, rect=False,
                        plots=False, device="cpu", verbose=False, workers=0)
    return {"map": float(metrics.box.map), "map50": float(metrics.box.map50)}


def _tflite_in_place(best: Path, tflite: str, imgsz: int, cut: bool):
    """A YOLO whose DetectionModel runs the TFLite file instead of its own layers (a cut
    file: then the model's own Detect arithmetic decodes its head outputs, on the host)."""
    from ultralytics import YOLO

    from vbxfx.integrations.ultralytics_head import decode_head
    from vbxfx.quant.interpreter import TfliteRunner

    y = YOLO(str(best))
    det = y.model.float().eval()
    with torch.no_grad():
        out = det(torch.zeros(1, 3, imgsz, imgsz))
    shape = tuple((out[0] if isinstance(out, (list, tuple)) else out).shape[1:])
    runner = TfliteRunner(tflite)

    def forward(self, im, *a, **k):
        x = im.detach().float().cpu().numpy()
        if cut:
            return decode_head(runner.run(x), det, layout="NHWC").float()
        got = runner.run(x, expect_shapes=[(x.shape[0], *shape)])[0]
        return torch.from_numpy(got).float()

    det.forward = types.MethodType(forward, det)
    det.fuse = types.MethodType(lambda self, *a, **k: self, det)
    return y


def _int8_rows(label: str, best: Path, data: Path, root: Path, args, float_map: dict) -> list:
    from ultralytics import YOLO

    from vbxfx.check.tflite_check import check_tflite
    from vbxfx.export.foreign import annotate_onnx
    from vbxfx.inputs.calib import calibration_from_spec
    from vbxfx.integrations.onnx2tf import convert_to_tflite
    from vbxfx.quant import calibrate_int8, float_reference_path

    work = root / f"int8-{label}"
    work.mkdir()
    onnx_path = Path(YOLO(str(best)).export(format="onnx", imgsz=args.imgsz))
    annotated = work / "model.onnx"
    if label == "dense":                 # nothing to annotate
        shutil.copyfile(onnx_path, annotated)
    else:
        annotate_onnx(onnx_path, YOLO(str(best)).model, annotated)
    expect = None if label == "dense" else annotated
    images = str(data.parent / "images" / "train")
    rows = []
    if args.full_graph:                  # the whole graph in int8: one grid for boxes and scores
        full = work / "full.tflite"
        convert_to_tflite(annotated, full, calib=images, normalize="none", int8="converter",
                          onnx2tf=args.onnx2tf)
        m = _val(_tflite_in_place(best, str(full), args.imgsz, cut=False), data, args)
        rows.append(dict(model=label, method="converter, whole graph", **m,
                         float_map=float_map["map"], float_map50=float_map["map50"],
                         repeats_hold=check_tflite(full, expect=expect).ok, seconds=0.0))
        print(_line(rows[-1]), file=sys.stderr)
    base = work / "model.tflite"
    t0 = time.perf_counter()
    convert_to_tflite(annotated, base, calib=images, normalize="none", int8="converter",
                      onnx2tf=args.onnx2tf, cut="detect-head")
    print(f"{label}: converted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    calib = calibration_from_spec(images, (1, 3, args.imgsz, args.imgsz), normalize=False)
    for method in args.methods:
        path = base if method == "converter" else work / f"model_{method}.tflite"
        seconds = 0.0
        if method != "converter":
            rep = calibrate_int8(base, float_reference_path(base), calib[:args.samples],
                                 method=method, output=path)
            seconds = rep.seconds
        check = check_tflite(path, expect=expect)
        m = _val(_tflite_in_place(best, str(path), args.imgsz, cut=True), data, args)
        rows.append(dict(model=label, method=method, **m, float_map=float_map["map"],
                         float_map50=float_map["map50"], repeats_hold=check.ok,
                         seconds=seconds))
        print(_line(rows[-1]), file=sys.stderr)
    return rows


def _line(r: dict) -> str:
    return (f"| {r['model']:<6} | {r['method']:<9} | {r['float_map']:.3f} | {r['map']:.3f} | "
            f"{r['map'] - r['float_map']:+.3f} | {r['float_map50']:.3f} | {r['map50']:.3f} | "
            f"{'yes' if r['repeats_hold'] else 'NO'} | {r['seconds']:4.0f} |")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The generated data set and the dense training, as the YOLO benchmarks share them."""
    p.add_argument("--images", type=int, default=256, help="generated training images")
    p.add_argument("--val", type=int, default=64, help="generated validation images")
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--epochs", type=int, default=40, help="dense training epochs")
    p.add_argument("--batch", type=int, default=16)


def trained_dense(args, prefix: str) -> tuple[Path, Path, Path]:
    """``(root, data.yaml, dense best.pt)``: a temporary folder with ultralytics kept offline,
    the generated data set, and yolov8n.yaml trained on it (``add_data_args``' options)."""
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    offline_ultralytics(root / "settings")
    data = make_detection_set(root / "data", train=args.images, val=args.val, size=args.imgsz)
    return root, data, _train(root, data, "dense", args, "yolov8n.yaml")


def run(args) -> list[dict]:
    root, data, dense = trained_dense(args, "bench-yolo-int8-")
    from ultralytics import YOLO

    from vbxfx.integrations.ultralytics import compressed_trainer

    rows = []
    for c in args.compression:
        if c == 0:
            label, best = "dense", dense
        else:
            label = f"{c:.2f}"
            best = _train(root, data, f"c{c}", args, str(dense), epochs=args.finetune_epochs,
                          trainer=compressed_trainer(c))
        float_map = _val(YOLO(str(best)), data, args)
        print(f"{label}: float mAP50-95 {float_map['map']:.3f}", file=sys.stderr)
        rows += _int8_rows(label, best, data, root, args, float_map)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--finetune-epochs", type=int, default=10,
                   help="epochs of compressed fine-tuning from the dense best.pt")
    p.add_argument("--compression", type=float, nargs="+", default=[0.0, 0.66],
                   help="0 for the dense model")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["converter", "bias"])
    p.add_argument("--samples", type=int, default=32,
                   help="calibration images calibrate_int8 runs on (the export's default)")
    p.add_argument("--no-full-graph", dest="full_graph", action="store_false",
                   help="skip the row of the whole graph in int8 (not cut at the head)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onnx2tf", default=None, help="the onnx2tf executable")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print_rows(f"yolov8n on generated data, {args.images} train / {args.val} val images at "
               f"{args.imgsz} px (load {os.getloadavg()[0]:.2f})",
               "| model | int8 | float mAP50-95 | int8 mAP50-95 | difference | float mAP50 | "
               "int8 mAP50 | repeats | s |", rows, _line, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
