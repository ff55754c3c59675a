"""YOLO users train compressed inside the ultralytics trainer (vbxfx.integrations.ultralytics).

Real ultralytics 8.4 training of yolov8n on a detection set generated here (16 train / 8 val
images at 64 px, two classes), on the CPU, with ultralytics' settings in a temporary folder
so nothing reaches the network.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vbxfx
from vbxfx.errors import ConfigError
from vbxfx.format import weight_repeat
from vbxfx.integrations import ultralytics as vu
from vbxfx.modules import compressed_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from yolo_data import make_detection_set, offline_ultralytics  # noqa: E402

TRAIN = dict(epochs=1, imgsz=64, batch=8, workers=0, plots=False, device="cpu", amp=False,
             verbose=False, exist_ok=True)


# ------------------------------------------------------------------ no training needed
def _small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 5))


def test_options_are_checked_when_given():
    with pytest.raises(ConfigError, match="compression"):
        vu.compressed_trainer(1.5)
    with pytest.raises(ConfigError, match="budget"):
        vu.compressed_trainer(0.66, budget="flops")
    with pytest.raises(TypeError):
        vu.compressed_trainer(0.66, colour="red")
    with pytest.raises(ConfigError, match="task"):
        vu.compressed_trainer(0.66)(overrides={"task": "depth"})


def test_transfer_compression_copies_levels_patterns_and_counters():
    src = _small()
    vbxfx.compress_vbx3(src, 0.66)
    src[0]._vbx_steps = 17
    src[2].freeze()
    dst = _small(seed=1)
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if "vbx_" not in k})
    names = vu.transfer_compression(src, dst)
    assert names == ["0", "2", "4"]
    for (n, a), (_, b) in zip(compressed_modules(src), compressed_modules(dst)):
        assert a.repeat == b.repeat and torch.equal(a.pair_index, b.pair_index), n
    assert dst[0]._vbx_steps == 17 and dst[2].frozen
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(dst(x), src(x))


def test_transfer_rederives_a_layer_whose_shape_changed():
    src = _small()
    vbxfx.compress_vbx3(src, 0.5)
    dst = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 7))          # a new head
    vu.transfer_compression(src, dst)
    assert vbxfx.is_compressed(dst[4]) and dst[4].repeat == src[4].repeat
    assert weight_repeat(dst[4].compressed_weight().detach()) <= 2


def test_follow_patterns_copies_only_what_changed():
    model = _small()
    vbxfx.compress_vbx3(model, 0.5, refresh_every=1)
    ema = __import__("copy").deepcopy(model)
    seen: dict = {}
    assert vu.follow_patterns(model, ema, seen) == 3       # first call: every layer
    assert vu.follow_patterns(model, ema, seen) == 0       # nothing changed since
    model.train()
    with torch.no_grad():
        model[0].weight.add_(torch.randn_like(model[0].weight))
    model(torch.randn(1, 8, 4, 4))                        # counts one step
    model(torch.randn(1, 8, 4, 4))                        # refreshes every layer
    assert vu.follow_patterns(model, ema, seen) == 3
    for (_, a), (_, b) in zip(compressed_modules(model), compressed_modules(ema)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.vbx_coef_b, b.vbx_coef_b)


def test_command_line_arguments_split_between_yolo_and_vbxfx():
    model, yolo, ours = vu._parse(["train", "model=yolov8n.yaml", "data=d.yaml", "epochs=3",
                                   "compression=0.7", "exclude=model.0.*,model.22.*",
                                   "calib=64"])
    assert model == "yolov8n.yaml" and yolo == {"data": "d.yaml", "epochs": 3}
    assert ours == {"compression": 0.7, "exclude": ("model.0.*", "model.22.*"), "calib": 64}
    assert vu.compressed_trainer(**ours).options.calib == 64
    assert vu.main(["train", "data=d.yaml"]) == 2
    assert vu.main(["fit", "model=a.pt"]) == 2


# ---------------------------------------------------------------------- real training
@pytest.fixture(scope="module")
def yolo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    offline_ultralytics(root)
    data = make_detection_set(root / "data", train=16, val=8, size=64)
    return root, data


def _train(env, name, model="yolov8n.yaml", **extra):
    from ultralytics import YOLO

    root, data = env
    y = YOLO(model)
    options = {**TRAIN, **extra}
    y.train(data=str(data), project=str(root / "runs"), name=name, **options)
    return y, root / "runs" / name / "weights"


def _layers(module):
    return dict(compressed_modules(module))


def _checkpoint_model(path):
    ckpt = torch.load(path, weights_only=False)      # stripped: the EMA moved to "model"
    return (ckpt.get("ema") or ckpt["model"]).float()


def _fits(module):
    return {n: weight_repeat(l.compressed_weight().detach()) <= l.repeat
            for n, l in compressed_modules(module)}


@pytest.fixture(scope="module")
def trained(yolo_env):
    snapshots = []

    def keep_last(trainer):             # last.pt of epoch 1 of 2, optimizer included
        if trainer.epoch == 0:
            target = trainer.wdir.parent / "epoch1_last.pt"
            shutil.copyfile(trainer.last, target)
            snapshots.append({n: (l.mask.clone(), l._vbx_steps)
                              for n, l in compressed_modules(trainer.ema.ema)})

    from ultralytics import YOLO

    root, data = yolo_env
    y = YOLO("yolov8n.yaml")
    y.add_callback("on_model_save", keep_last)
    y.train(data=str(data), project=str(root / "runs"), name="vbx", **{**TRAIN, "epochs": 2},
            trainer=vu.compressed_trainer(0.66, refresh_every=1))
    return y, root / "runs" / "vbx", snapshots


@pytest.mark.slow
def test_trainer_model_ema_and_checkpoints_are_compressed(trained):
    y, run, _ = trained
    trainer = y.trainer
    live, ema = _layers(trainer.model), _layers(trainer.ema.ema)
    assert len(live) >= 60 and set(live) == set(ema)
    assert all(_fits(trainer.ema.ema).values())
    # refresh_every=1: the patterns moved during training, and the EMA followed them
    for name, layer in ema.items():
        assert torch.equal(layer.mask, live[name].mask), name
        assert torch.equal(layer.pair_index, live[name].pair_index), name
    assert any(l.pattern_version > 2 for l in live.values())
    # DFL: fixed arange(16) weights, frozen by ultralytics, left dense
    assert not vbxfx.is_compressed(trainer.model.model[22].dfl.conv)
    for ckpt in ("last.pt", "best.pt"):
        loaded = _checkpoint_model(run / "weights" / ckpt)
        assert set(_layers(loaded)) == set(live), ckpt
        assert all(_fits(loaded).values()), ckpt


@pytest.mark.slow
def test_checkpoint_stays_within_1_5x_of_dense(trained, yolo_env):
    _, run, _ = trained
    _, dense = _train(yolo_env, "dense")
    ratio = (run / "weights" / "best.pt").stat().st_size / (dense / "best.pt").stat().st_size
    assert ratio <= 1.5, ratio


@pytest.mark.slow
def test_best_pt_validates_predicts_and_exports(trained):
    import numpy as np
    from ultralytics import YOLO

    _, run, _ = trained
    best = YOLO(str(run / "weights" / "best.pt"))
    assert len(_layers(best.model)) >= 60
    best.val(data=str(run.parents[1] / "data" / "data.yaml"), imgsz=64, batch=8, plots=False,
             device="cpu", verbose=False)
    assert len(best.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)) == 1
    onnx_path = best.export(format="onnx", imgsz=64)
    # the file yolo export writes (BatchNorm fused, TorchScript), checked against best.pt
    model = _checkpoint_model(run / "weights" / "best.pt").eval()
    report = vbxfx.check_onnx(onnx_path, torch_model=model)
    assert report.ok, report.problems
    assert len(report.layers) == len(_layers(model))
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(onnx_path)
    node = next(n for n in proto.graph.node if n.name == "/model.2/cv1/conv/Conv")
    init = next(i for i in proto.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0, :8, 0, 0] = [0.3, 0.2, 0.1, 0.05, 0.4, 0.25, 0.15, 0.35]
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    tampered = Path(onnx_path).with_name("tampered.onnx")
    onnx.save(proto, str(tampered))
    bad = vbxfx.check_onnx(tampered, torch_model=model)
    assert not bad.ok and any("'model.2.cv1.conv'" in p for p in bad.problems)


@pytest.mark.slow
def test_resume_continues_compressed(trained):
    from ultralytics import YOLO

    _, run, snapshots = trained
    saved = snapshots[0]
    y = YOLO(str(run / "epoch1_last.pt"))
    captured = {}

    def at_start(trainer):
        captured.update({n: (l.mask.clone(), l._vbx_steps)
                         for n, l in compressed_modules(trainer.model)})

    y.add_callback("on_train_start", at_start)
    y.train(resume=True, trainer=vu.compressed_trainer(0.66, refresh_every=1))
    assert set(captured) == set(saved)
    for name, (mask, steps) in saved.items():
        assert torch.equal(captured[name][0], mask), name
        assert captured[name][1] == steps, name
    assert len(_layers(y.trainer.ema.ema)) == len(saved)


@pytest.mark.slow
def test_training_again_from_a_compressed_best_pt_stays_compressed(trained, yolo_env):
    _, run, _ = trained
    from ultralytics import YOLO

    source = _layers(_checkpoint_model(run / "weights" / "best.pt"))
    y = YOLO(str(run / "weights" / "best.pt"))
    y.train(data=str(yolo_env[1]), project=str(yolo_env[0] / "runs"), name="again",
            **TRAIN, trainer=vu.compressed_trainer(0.5))
    again = _layers(y.trainer.model)
    assert set(again) == set(source)
    assert {n: l.repeat for n, l in again.items()} == {n: l.repeat for n, l in source.items()}


@pytest.mark.slow
def test_plain_compress_vbx3_on_a_yolo_model_names_the_entry_point(yolo_env, caplog):
    from ultralytics import YOLO

    y = YOLO("yolov8n.yaml")
    with caplog.at_level(logging.WARNING, logger="vbxfx"):
        vbxfx.compress_vbx3(y.model, 0.66)
    assert "compressed_trainer" in caplog.text


@pytest.mark.slow
def test_bench_yolo_prints_its_table(yolo_env, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_yolo

    out = bench_yolo.main(["--epochs", "2", "--images", "8", "--imgsz", "64", "--batch", "8"])
    text = capsys.readouterr().out
    assert "training step" in text and "epoch time" in text and "best.pt size" in text
    assert out["compressed"]["size"] > 0 and out["compressed"]["setup"] > 0
    assert out["dense"]["setup"] == 0.0


@pytest.mark.slow
def test_vbxfx_yolo_train_on_the_command_line(yolo_env):
    import os
    import subprocess

    root, data = yolo_env
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "vbxfx")] if (bin_dir / "vbxfx").exists() else [sys.executable, "-m",
                                                                           "vbxfx"]
    proc = subprocess.run(cmd + ["yolo", "train", "model=yolov8n.yaml", f"data={data}",
                                 "epochs=1", "imgsz=64", "batch=8", "workers=0", "plots=False",
                                 "device=cpu", f"project={root / 'runs'}", "name=cli",
                                 "exist_ok=True", "compression=0.5", "calib=4"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "YOLO_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers compressed" in proc.stderr
    assert "reconstruct (sequential)" in proc.stderr and "on 4 training images" in proc.stderr
    best = _checkpoint_model(root / "runs" / "cli" / "weights" / "best.pt")
    assert {l.repeat for l in _layers(best).values()} == {2}          # 0.5: every layer 2:4
    assert all(l.bias is not None for l in _layers(best).values())    # calib gave them one
    bad = subprocess.run(cmd + ["yolo", "train", "data=d.yaml"], capture_output=True, text=True)
    assert bad.returncode == 2 and "model=" in bad.stderr


@pytest.mark.slow
def test_the_whole_yolo_path_to_the_int8_tflite(trained, tmp_path):
    """best.pt -> yolo's own ONNX export -> vbxfx check / annotate -> onnx2tf int8 TFLite ->
    vbxfx check of the file vnnx_compile reads: every declared repeat holds there."""
    from ultralytics import YOLO

    from converter import onnx2tf_or_skip
    from vbxfx.check.tflite_check import check_tflite
    from vbxfx.cli.main import main

    exe = onnx2tf_or_skip()
    _, run, _ = trained
    best = run / "weights" / "best.pt"
    onnx_path = Path(YOLO(str(best)).export(format="onnx", imgsz=64))
    annotated = tmp_path / "best_vbx.onnx"
    assert main(["annotate", str(onnx_path), "--model", str(best), "-o", str(annotated)]) == 0
    tfl = tmp_path / "best.tflite"
    assert main(["export", str(annotated), "--tflite", str(tfl), "--onnx2tf", exe,
                 "--normalize", "none", "--calib", str(run.parents[1] / "data" / "images" /
                                                        "train")]) == 0
    report = check_tflite(tfl, expect=annotated)
    declared = [r for r in report.layers if r.declared_fmt == "comp"]
    assert report.ok, report.problems
    assert len(declared) == len(_layers(_checkpoint_model(best)))
    assert all(r.repeat == r.declared_repeat for r in declared)


@pytest.mark.slow
def test_compress_a_yolo_model_with_its_training_images_as_calibration(yolo_env, tmp_path,
                                                                        capsys):
    """`vbxfx compress ultralytics:yolov8n.yaml --calib images/train`: YOLO does not trace
    symbolically, so the sequential refit runs by hooks, and lowers the layers' output
    error; the exported file checks."""
    from vbxfx.cli.main import main

    root, data = yolo_env
    out = tmp_path / "y.onnx"
    rc = main(["compress", "ultralytics:yolov8n.yaml", "--input-shape", "1,3,64,64",
               "--compression", "0.66", "--calib", str(data.parent / "images" / "train"),
               "-o", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    refit = report["report"]["reconstruct"]
    assert refit["method"] == "sequential" and refit["layers"] > 50
    before, after = refit["mean_output_error"]
    assert after < before
    assert out.exists()


@pytest.mark.slow
def test_trainer_refits_on_calib_training_images_before_the_first_epoch(yolo_env):
    """``compressed_trainer(0.66, calib=8)``: the sequential refit (by hooks) on 8 training
    images runs before the optimizer and the EMA exist, so both hold the refit weights and
    the biases it gives every compressed layer."""
    seen = {}

    def before_training(trainer):
        model = trainer.model
        seen["weights"] = {n: (l.weight.detach().clone(), l.bias.detach().clone())
                           for n, l in compressed_modules(model)}
        seen["ema"] = {n: (l.weight.detach().clone(), l.bias.detach().clone())
                       for n, l in compressed_modules(trainer.ema.ema)}
        in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        seen["biases_trained"] = all(id(l.bias) in in_optimizer
                                     for _, l in compressed_modules(model))

    from ultralytics import YOLO

    root, data = yolo_env
    y = YOLO("yolov8n.yaml")
    y.add_callback("on_pretrain_routine_end", before_training)
    y.train(data=str(data), project=str(root / "runs"), name="calib", **TRAIN,
            trainer=vu.compressed_trainer(0.66, calib=8))
    calib = y.trainer.vbx_report["calib"]
    assert calib["images"] == 8 and calib["method"] == "sequential" and calib["layers"] > 50
    assert calib["error_after"] < calib["error_before"]
    assert seen["biases_trained"]
    for n, (w, b) in seen["weights"].items():           # the EMA starts from the refit model
        torch.testing.assert_close(seen["ema"][n][0], w)
        torch.testing.assert_close(seen["ema"][n][1], b)
    assert any(bool(b.abs().sum() > 0) for _, b in seen["weights"].values())
    # what a user does next with it: ultralytics' own val and ONNX export, then vbxfx check
    best = root / "runs" / "calib" / "weights" / "best.pt"
    trained = YOLO(str(best))
    metrics = trained.val(data=str(data), imgsz=64, batch=8, plots=False, device="cpu",
                          verbose=False, workers=0)
    assert 0.0 <= float(metrics.box.map) <= 1.0
    onnx_file = trained.export(format="onnx", imgsz=64, device="cpu")
    model = _checkpoint_model(best).eval()        # BatchNorm fused into the refit biases
    report = vbxfx.check_onnx(onnx_file, torch_model=model)
    assert report.ok, report.problems
    assert len(report.layers) == len(_layers(model))
    with pytest.raises(ConfigError, match="calib must be a number of training images"):
        vu.compressed_trainer(0.66, calib=-1)


@pytest.mark.slow
def test_trainer_with_channel_pruning_trains_saves_and_trains_again(yolo_env):
    """``compressed_trainer(0.7, methods=("channels", "sparsity"), calib=8)``: the model is
    pruned (smaller BatchNorms) and refit on training images by hooks; best.pt validates and
    exports; training again from it keeps its pruned shapes (ultralytics alone would rebuild
    the dense yaml and keep only the weights whose shapes match)."""
    from ultralytics import YOLO

    root, data = yolo_env
    y = YOLO("yolov8n.yaml")
    dense_bn = {n: m.num_features for n, m in y.model.named_modules()
                if isinstance(m, torch.nn.BatchNorm2d)}
    y.train(data=str(data), project=str(root / "runs"), name="pruned", **TRAIN,
            trainer=vu.compressed_trainer(0.7, methods=("channels", "sparsity"), calib=8))
    report = y.trainer.vbx_report
    assert report["achieved"] >= 0.7 and report["calib"]["images"] == 8
    best = root / "runs" / "pruned" / "weights" / "best.pt"
    saved = _checkpoint_model(best)
    smaller = {n for n, m in saved.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
               and m.num_features < dense_bn[n]}
    assert smaller and _layers(saved)
    trained = YOLO(str(best))
    metrics = trained.val(data=str(data), imgsz=64, batch=8, plots=False, device="cpu",
                          verbose=False, workers=0)
    assert 0.0 <= float(metrics.box.map) <= 1.0
    onnx_file = trained.export(format="onnx", imgsz=64, device="cpu")
    assert vbxfx.check_onnx(onnx_file, torch_model=_checkpoint_model(best).eval()).ok
    again = YOLO(str(best))
    again.train(data=str(data), project=str(root / "runs"), name="pruned_again", **TRAIN,
                trainer=vu.compressed_trainer(0.7, methods=("channels", "sparsity")))
    shapes = {n: m.num_features for n, m in again.trainer.model.named_modules()
              if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(shapes[n] < dense_bn[n] for n in smaller)
    assert set(_layers(again.trainer.model)) == set(_layers(saved))
