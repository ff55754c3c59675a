"""Training yolov8n compressed in the ultralytics trainer vs dense: epoch time and checkpoint size.

Both runs in one process, same generated data (tools/yolo_data.py), same settings; the
compressed run uses ``vbxfx.integrations.ultralytics.compressed_trainer``. Times come from
the trainer's callbacks: each training step (forward, backward, optimizer step, EMA update),
the training part of each epoch, and its validation plus checkpoint; medians, with the first
epoch left out (warm-up, data cache). The one-off compression before training is timed apart.
Since the two trainings run one after the other, load from other jobs can favour either: the
first row times one training step of both models turn about, which load hits alike. Targets (issue #13): epoch time
compressed / dense <= 1.15x, best.pt size <= 1.5x.

    YOLO_OFFLINE=1 python tools/bench_yolo.py --epochs 6 --images 64 --imgsz 160 --threads 1
    YOLO_OFFLINE=1 python tools/bench_yolo.py --steps-only --imgsz 640 --batch 4 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from yolo_data import make_detection_set, offline_ultralytics  # noqa: E402


def _run(root: Path, data: Path, name: str, args: argparse.Namespace, trainer=None) -> dict:
    from ultralytics import YOLO

    marks: dict[str, float] = {}
    times: dict[str, list[float]] = {"batch": [], "train": [], "val_save": []}

    def mark(key):
        return lambda _t: marks.__setitem__(key, time.perf_counter())

    def since(key, into):
        return lambda _t: times[into].append(time.perf_counter() - marks[key])

    y = YOLO(args.model)
    y.add_callback("on_train_epoch_start", mark("epoch"))
    y.add_callback("on_train_batch_start", mark("batch"))
    y.add_callback("on_train_batch_end", since("batch", "batch"))
    y.add_callback("on_train_epoch_end", since("epoch", "train"))
    y.add_callback("on_train_epoch_end", mark("val"))
    y.add_callback("on_fit_epoch_end", lambda t: times["val_save"].append(
        time.perf_counter() - marks["val"]) if "val" in marks else None)
    t0 = time.perf_counter()
    y.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=0,
            plots=False, device=args.device, amp=False, verbose=False, exist_ok=True,
            project=str(root / "runs"), name=name, val=True, trainer=trainer)
    total = time.perf_counter() - t0
    best = root / "runs" / name / "weights" / "best.pt"
    copies = _copy_times(best)
    per_epoch = max(1, len(times["batch"]) // max(1, len(times["train"])))
    skip = lambda xs, k: xs[k:] or xs          # noqa: E731 - leave the first epoch out
    setup = getattr(y.trainer, "vbx_setup_seconds", 0.0)
    return {"batch": statistics.median(skip(times["batch"], per_epoch)),
            "train": statistics.median(skip(times["train"], 1)),
            "val_save": statistics.median(skip(times["val_save"][:args.epochs], 1)),
            "total": total, "size": best.stat().st_size, "setup": setup, **copies}


def _copy_times(best: Path, repeat: int = 3) -> dict:
    """What ultralytics does with the model around a checkpoint: load it, deep-copy it to
    float16, save it; best of ``repeat``."""
    import copy
    import io

    import torch

    def best_of(fn):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    raw = best.read_bytes()
    load, ckpt = best_of(lambda: torch.load(io.BytesIO(raw), weights_only=False))
    model = (ckpt.get("ema") or ckpt["model"]).float()
    half, copied = best_of(lambda: copy.deepcopy(model).half())
    save, _ = best_of(lambda: torch.save({"ema": copied}, io.BytesIO()))
    return {"load": load, "copy_half": half, "save": save}


def _interleaved_steps(args: argparse.Namespace, rounds: int) -> tuple[float, float]:
    """Median seconds of one training step of the dense and the compressed model, the two
    run turn about (ABAB...) so that load from other jobs hits both alike: forward, a loss
    over every output, backward, SGD step, ultralytics' ModelEMA update, and for the
    compressed model the EMA following its patterns, as the trainer does
    (``tools/bench_finetune.py``'s steps)."""
    import torch
    from bench_finetune import build, interleaved, stepper

    dense, comp = build(Path(args.model).stem, args.imgsz, args.compression)
    x = torch.randn(args.batch, 3, args.imgsz, args.imgsz)
    t_dense, t_comp = interleaved([stepper(dense, x, yolo=True), stepper(comp, x, yolo=True)],
                                  rounds)
    return t_dense, t_comp


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolov8n.yaml")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=64, help="training images (val: a quarter)")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compression", type=float, default=0.66)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--steps-only", action="store_true",
                   help="only the turn-about step timing (no training runs), e.g. at 640 px")
    p.add_argument("--rounds", type=int, default=12, help="turn-about rounds (default 12)")
    args = p.parse_args(argv)
    if args.steps_only:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        load = os.getloadavg()
        steps = _interleaved_steps(args, rounds=args.rounds)
        print(f"{args.model} at {args.imgsz} px, batch {args.batch}, threads "
              f"{torch.get_num_threads()}, {args.rounds} rounds; load average {load[0]:.2f} -> "
              f"{os.getloadavg()[0]:.2f}")
        print(f"training step, dense/compressed in turn: {steps[0]:.3f} s / {steps[1]:.3f} s "
              f"= {steps[1] / steps[0]:.2f}x")
        return {"interleaved_steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        offline_ultralytics(root)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from vbxfx.integrations.ultralytics import compressed_trainer

        data = make_detection_set(root / "data", train=args.images,
                                  val=max(4, args.images // 4), size=args.imgsz)
        load = os.getloadavg()
        dense = _run(root, data, "dense", args)
        comp = _run(root, data, "vbx", args, trainer=compressed_trainer(args.compression))
        steps = _interleaved_steps(args, rounds=args.rounds)
        load_after = os.getloadavg()
    for r in (dense, comp):
        r["epoch"] = r["train"] + r["val_save"]
    rows = [("step, dense/compressed in turn (s)", steps[0], steps[1]),
            ("training step (s)", dense["batch"], comp["batch"]),
            ("training part of an epoch (s)", dense["train"], comp["train"]),
            ("validation + checkpoint (s)", dense["val_save"], comp["val_save"]),
            ("epoch time (s)", dense["epoch"], comp["epoch"]),
            ("whole train() call (s)", dense["total"], comp["total"]),
            ("best.pt size (MB)", dense["size"] / 1e6, comp["size"] / 1e6),
            ("torch.load(best.pt) (s)", dense["load"], comp["load"]),
            ("deepcopy(model).half() (s)", dense["copy_half"], comp["copy_half"]),
            ("torch.save of that copy (s)", dense["save"], comp["save"])]
    print(f"{args.model} at {args.imgsz} px, {args.images} images, batch {args.batch}, "
          f"{args.epochs} epochs, {args.device}, threads {torch.get_num_threads()}; load "
          f"average {load[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'medians, first epoch left out':36}{'dense':>10}{'compressed':>12}{'ratio':>8}")
    for label, a, b in rows:
        print(f"{label:36}{a:10.3f}{b:12.3f}{b / a:8.2f}x")
    print(f"compression before training (inside the first train() call): {comp['setup']:.1f} s")
    return {"dense": dense, "compressed": comp, "interleaved_steps": steps}


if __name__ == "__main__":
    main()
