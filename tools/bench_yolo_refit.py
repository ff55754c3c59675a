"""Benchmark: mAP of yolov8n compressed one-shot, with each refit, and after the trainer's calib.

yolov8n.yaml is trained dense by ultralytics on a generated two-class detection set
(tools/yolo_data.py). Its best.pt is compressed one-shot (no training) at each
``--compression`` by ``vbxfx.compress`` with the first ``--calib`` training images as
calibration data (``--include-frozen``: the DFL convolution too) and

* ``none``: the projection only (``reconstruct=False``);
* ``local``: every layer refit on the dense model's inputs (``method="local"``);
* ``sequential``: the default, layer by layer on the inputs the compressed model gives
  (YOLO does not trace symbolically: by hooks, :mod:`vbxfx.refit.hooks`);

and ultralytics' validator measures mAP50-95 on the validation images. With
``--finetune-epochs N``, ``compressed_trainer(c)`` and ``compressed_trainer(c, calib=...)``
also fine-tune from best.pt for N epochs (``--optimizer``, ``--lr0``; mAP of their best.pt).

    YOLO_OFFLINE=1 OMP_NUM_THREADS=2 python tools/bench_yolo_refit.py --images 256 --val 64 \\
        --imgsz 64 --epochs 40 --compression 0.66 0.75 --calib 64 --finetune-epochs 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_yolo_int8 import _train, _val, add_data_args, trained_dense  # noqa: E402
from markdown_table import print_rows  # noqa: E402

REFITS = {"none": False, "local": {"method": "local"}, "sequential": {"method": "sequential"}}


def _one_shot(best: Path, data: Path, images: torch.Tensor, c: float, refit: str, args) -> dict:
    import vbxfx
    from ultralytics import YOLO

    y = YOLO(str(best))
    t0 = time.perf_counter()
    result = vbxfx.compress(y.model, images[:1], compression=c, calib_data=images.split(16),
                            reconstruct=REFITS[refit], include_frozen=args.include_frozen)
    seconds = time.perf_counter() - t0
    method = (result.report.get("reconstruct") or {}).get("method", "-")
    y.model = result.model
    return {"compression": c, "variant": f"one-shot, {refit} refit", "method": method,
            **_val(y, data, args), "seconds": seconds}


def run(args) -> list[dict]:
    root, data, best = trained_dense(args, "bench-yolo-refit-")
    from ultralytics import YOLO

    from vbxfx.inputs.calib import load_calibration
    from vbxfx.integrations.ultralytics import compressed_trainer

    rows = [{"compression": 0.0, "variant": "dense", "method": "-",
             **_val(YOLO(str(best)), data, args), "seconds": 0.0}]
    images = load_calibration(data.parent / "images" / "train",
                              (1, 3, args.imgsz, args.imgsz), normalize=False,
                              limit=args.calib)
    for c in args.compression:
        for refit in args.refits:
            rows.append(_one_shot(best, data, images, c, refit, args))
            print(rows[-1], file=sys.stderr)
        if args.finetune_epochs:
            schedule = {k: v for k, v in (("optimizer", args.optimizer), ("lr0", args.lr0))
                        if v is not None}
            how = ", ".join(f"{k}={v}" for k, v in schedule.items()) or "ultralytics' defaults"
            for calib in (0, args.calib):
                t0 = time.perf_counter()
                tuned = _train(root, data, f"c{c}-calib{calib}", args, str(best),
                               epochs=args.finetune_epochs,
                               trainer=compressed_trainer(c, calib=calib), **schedule)
                rows.append({"compression": c, "method": "sequential" if calib else "-",
                             "variant": f"{args.finetune_epochs} epochs ({how}), calib={calib}",
                             **_val(YOLO(str(tuned)), data, args),
                             "seconds": time.perf_counter() - t0})
                print(rows[-1], file=sys.stderr)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--compression", type=float, nargs="+", default=[0.66, 0.75])
    p.add_argument("--refits", nargs="+", choices=list(REFITS), default=list(REFITS))
    p.add_argument("--calib", type=int, default=64, help="calibration (training) images")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="also fine-tune in the trainer, with and without calib")
    p.add_argument("--optimizer", default=None, help="the fine-tuning's optimizer (default: "
                   "ultralytics' 'auto', AdamW for short runs)")
    p.add_argument("--lr0", type=float, default=None, help="the fine-tuning's learning rate")
    p.add_argument("--include-frozen", action="store_true",
                   help="compress frozen layers too, the DFL convolution included (how "
                        "vbxfx treated a model loaded for inference before issue 25)")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    rows = run(args)
    print_rows(f"yolov8n on generated data, {args.images} train / {args.val} val images at "
               f"{args.imgsz} px, dense {args.epochs} epochs, {args.calib} calibration images "
               f"(load {load:.2f} -> {os.getloadavg()[0]:.2f})",
               "| compression | variant | refit | mAP50-95 | mAP50 | s |", rows,
               lambda r: (f"| {r['compression']:.2f} | {r['variant']} | {r['method']} | "
                          f"{r['map']:.3f} | {r['map50']:.3f} | {r['seconds']:.0f} |"),
               args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
