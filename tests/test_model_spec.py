"""Model specs of the command line: ultralytics checkpoints, factories, saved files, weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from vbxfx.errors import ConfigError
from vbxfx.inputs.model_spec import check_input_memory, resolve_model

VBXFX = [sys.executable, "-m", "vbxfx"]


@pytest.fixture(scope="module")
def yolo_checkpoints(tmp_path_factory):
    """``last.pt`` and ``best.pt`` as ultralytics' trainer writes them: its own
    ``BaseTrainer.save_model`` (``ema`` holds the model, ``model`` is None) and, at the end of
    training, ``strip_optimizer`` (``model`` holds it, ``ema`` is None), trained at imgsz 64."""
    root = tmp_path_factory.mktemp("yolo")
    os.environ["YOLO_CONFIG_DIR"] = str(root / "config")
    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics.cfg import get_cfg
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA, strip_optimizer

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False)
    ema = ModelEMA(model)
    with torch.no_grad():                       # an EMA that differs from the live model
        for p in ema.ema.parameters():
            p.mul_(0.5)
    weights = root / "weights"
    trainer = types.SimpleNamespace(
        model=model, ema=ema, epoch=3, best_fitness=0.5, fitness=0.5,
        stopper=types.SimpleNamespace(best_fitness=0.5, best_epoch=3),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        scaler=torch.amp.GradScaler("cpu", enabled=False), args=get_cfg(overrides={"imgsz": 64}),
        metrics={}, read_results_csv=lambda: {}, wdir=weights, last=weights / "last.pt",
        best=weights / "best.pt", save_period=-1)
    BaseTrainer.save_model(trainer)
    strip_optimizer(weights / "best.pt")
    both = root / "both.pt"                    # older layouts kept the live model beside the EMA
    ckpt = torch.load(weights / "last.pt", weights_only=False)
    ckpt["model"] = model
    torch.save(ckpt, both)
    return {"last": weights / "last.pt", "best": weights / "best.pt", "both": both,
            "ema": ema.ema, "root": root}


def _first_conv(m: nn.Module) -> torch.Tensor:
    return next(x for x in m.modules() if isinstance(x, nn.Conv2d)).weight.detach().float()


@pytest.mark.slow
def test_ultralytics_checkpoints_resolve_to_the_ema_model(yolo_checkpoints):
    expected = _first_conv(yolo_checkpoints["ema"]).half().float()   # saved in float16
    for key in ("last", "best", "both"):
        resolved = resolve_model(str(yolo_checkpoints[key]))
        assert type(resolved.model).__name__ == "DetectionModel"
        assert resolved.family == "ultralytics" and resolved.input_shape == (1, 3, 64, 64)
        assert all(p.dtype == torch.float32 for p in resolved.model.parameters())
        torch.testing.assert_close(_first_conv(resolved.model), expected)


@pytest.mark.slow
def test_cli_analyzes_a_checkpoint_and_refuses_it_as_weights_in_one_line(yolo_checkpoints):
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    last = str(yolo_checkpoints["last"])
    out = subprocess.run(VBXFX + ["analyze", last, "--json"], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stderr
    names = [layer["name"] for layer in json.loads(out.stdout)["layers"]]
    assert "model.0.conv" in names
    bad = subprocess.run(VBXFX + ["analyze", "ultralytics:yolov8n.yaml", "--weights", last],
                         capture_output=True, text=True, timeout=900, env=env)
    assert bad.returncode == 2, bad.stderr
    assert "\x1b" not in bad.stderr and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "an ultralytics checkpoint" in lines[0]
    assert f"vbxfx analyze {last}" in lines[0]


def test_saved_dicts_that_hold_no_model(tmp_path):
    state = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), state)
    with pytest.raises(ConfigError, match="holds a state_dict, not a model.*--weights"):
        resolve_model(str(state))
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "weights": nn.Linear(2, 2).state_dict()}, other)
    with pytest.raises(ConfigError, match=r"holds a dict with keys 'epoch', 'weights' and no model"):
        resolve_model(str(other))


def test_pickled_weights_file_is_one_line(tmp_path):
    pickled = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(ConfigError) as caught:
        resolve_model("demo", weights=str(pickled))
    message = str(caught.value)
    assert "pickled Python objects" in message and "as the MODEL" in message
    assert "\n" not in message and "\x1b" not in message


def test_factories_that_need_arguments_or_raise(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def needs(width, depth=2):\n    return torch.nn.Linear(width, 2)\n"
        "def broken():\n    raise RuntimeError('no weights here')\n"
        "def fine(width=4):\n    return torch.nn.Linear(width, 2)\n")
    with pytest.raises(ConfigError, match=r"needs\(\) needs argument\(s\) width; vbxfx calls"):
        resolve_model(f"{tmp_path}/net.py:needs")
    with pytest.raises(ConfigError, match="broken\\(\\) raised RuntimeError: no weights here"):
        resolve_model(f"{tmp_path}/net.py:broken")
    assert isinstance(resolve_model(f"{tmp_path}/net.py:fine").model, nn.Linear)


def test_input_memory_is_refused_before_allocating():
    with pytest.raises(ConfigError, match=r"the input alone is 120.0 GB .* 1.0 GB of memory"):
        check_input_memory((1, 3, 100000, 100000), available=10 ** 9)
    check_input_memory((1, 3, 224, 224), available=10 ** 9)
