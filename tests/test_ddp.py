"""Compressed models under DistributedDataParallel: 2 CPU processes, gloo (issue #26).

Plain torch DDP over ``vbxfx.compress`` (DemoNet), and ultralytics' multi-GPU launcher with the
compressed trainer. The workers write what they hold to files; the assertions run here.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import vbxfx
from vbxfx.errors import ConfigError
from vbxfx.format import weight_repeat
from vbxfx.inputs.demo import DemoNet
from vbxfx.integrations import ultralytics as vu
from vbxfx.modules import compressed_modules, is_compressed
from vbxfx.modules.distributed import broadcast_compression

from test_ultralytics_train import TRAIN, _checkpoint_model, _fits, yolo_env  # noqa: F401

WORLD = 2
EXACT = dict(rtol=0, atol=0)


def _assert_equal(a, b, msg):
    torch.testing.assert_close(a, b, **EXACT, msg=lambda m: f"{msg}: {m}")


def _patterns(model):
    return {n: {"repeat": l.repeat, "mask": l.mask.clone(), "pair_index": l.pair_index.clone(),
                "pair_sign": l.pair_sign.clone(), "steps": l._vbx_steps,
                "refresh_every": l.refresh_every, "version": l.pattern_version}
            for n, l in compressed_modules(model)}


def _assert_same_patterns(a, b, where):
    assert set(a) == set(b), where
    for name in a:
        for key in ("mask", "pair_index", "pair_sign"):
            _assert_equal(a[name][key], b[name][key], f"{where} {name} {key}")
        for key in ("repeat", "steps", "refresh_every"):
            assert a[name][key] == b[name][key], (where, name, key)


# ------------------------------------------------------------------- plain torch DDP
def _train_ddp(model, rank, steps=5):
    """DDP with its defaults, SGD; each rank its own batches (as a DistributedSampler gives)."""
    start = _patterns(model)
    ddp = DistributedDataParallel(model.train())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"start": start, "end": _patterns(model),
            "weights": {n: l.weight.detach().clone() for n, l in compressed_modules(model)},
            "compressed": {n: (l.compressed_weight().detach().clone(), l.repeat)
                           for n, l in compressed_modules(model)}}


def _plain_ddp_worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    try:
        x = torch.zeros(1, 3, 64, 64)
        result = {}
        # every rank compresses the same model: wrapping in DDP is all it takes
        model = vbxfx.compress(DemoNet(), x, compression=0.6, refresh_every=2).model
        result["same"] = _train_ddp(model, rank)
        # the ranks compress differently: other weights, levels, layers, options, counters
        net = DemoNet(seed=rank)
        model = vbxfx.compress(net, x, compression=(0.6, 0.75)[rank], refresh_every=(2, 5)[rank],
                               exclude=(["fc"], ["layer1.conv1"])[rank]).model
        next(iter(compressed_modules(model)))[1]._vbx_steps = rank
        result["levels_before"] = {n: l.repeat for n, l in compressed_modules(model)}
        result["changed"] = broadcast_compression(model)
        result["changed_again"] = broadcast_compression(model)
        result["ignored"] = list(model._ddp_params_and_buffers_to_ignore)
        result["synced"] = _train_ddp(model, rank)
        # a rank that drifted (here: another weight, another pattern) takes rank 0's again
        if rank == 1:
            layer = model.get_submodule("layer2.conv1")
            with torch.no_grad():
                layer.weight.mul_(torch.rand(layer.weight.shape, generator=torch.Generator()))
            layer.refresh_pattern()
        result["drifted"] = broadcast_compression(model)
        result["after_drift"] = _patterns(model)
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def plain_ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_plain_ddp_worker, args=(str(out / "store"), out), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check_trained(r0, r1, where):
    _assert_same_patterns(r0["end"], r1["end"], where)
    for name in r0["weights"]:
        _assert_equal(r0["weights"][name], r1["weights"][name], f"{where} {name} weight")
    # the refreshes happened (5 steps, refresh_every=2) and moved some pattern
    assert all(p["version"] >= 3 for p in r0["end"].values()), where
    assert any(not torch.equal(r0["start"][n]["mask"], r0["end"][n]["mask"]) for n in r0["end"])
    # and the trained weights fit the format
    for name, (w, repeat) in r0["compressed"].items():
        assert weight_repeat(w) <= repeat, (where, name)


def test_ddp_alone_keeps_one_pattern_per_layer_when_every_rank_compressed_the_same(plain_ddp):
    r0, r1 = (r["same"] for r in plain_ddp)
    _assert_same_patterns(r0["start"], r1["start"], "start")
    _check_trained(r0, r1, "same")


def test_broadcast_compression_makes_rank_0s_compression_every_ranks(plain_ddp):
    r0, r1 = plain_ddp
    assert r0["changed"] == [] and r0["changed_again"] == [] and r1["changed_again"] == []
    # rank 1 compressed fc (rank 0 kept it dense) and left layer1.conv1 dense (rank 0 did not)
    assert "fc" in r1["levels_before"] and "layer1.conv1" not in r1["levels_before"]
    assert {"fc", "layer1.conv1"} <= set(r1["changed"])
    assert r0["levels_before"] != r1["levels_before"]
    _assert_same_patterns(r0["synced"]["start"], r1["synced"]["start"], "after broadcast")
    assert set(r1["synced"]["start"]) == set(r0["levels_before"])
    assert all(p["refresh_every"] == 2 and p["steps"] == 0
               for p in r1["synced"]["start"].values())
    _check_trained(r0["synced"], r1["synced"], "synced")
    # DDP leaves the pattern buffers alone: no broadcast of them before every forward
    assert {"layer1.conv1.mask", "layer1.conv1.vbx_pattern", "layer1.conv1.vbx_coef_b"} \
        <= set(r1["ignored"])
    assert r0["ignored"] == r1["ignored"]


def test_broadcast_compression_repairs_a_rank_that_drifted(plain_ddp):
    r0, r1 = plain_ddp
    assert r0["drifted"] == [] and r1["drifted"] == ["layer2.conv1"]
    _assert_same_patterns(r0["after_drift"], r1["after_drift"], "after drift")
    _assert_same_patterns(r0["synced"]["end"], r1["after_drift"], "rank 0's, unchanged")


def test_broadcast_compression_needs_a_process_group():
    model = vbxfx.compress(DemoNet(), torch.zeros(1, 3, 64, 64), compression=0.6).model
    with pytest.raises(ConfigError, match="init_process_group"):
        broadcast_compression(model)


# --------------------------------------------------------- ultralytics' DDP launcher
# What runs: YOLO(...).train(trainer=compressed_trainer(...)) in this process as the launcher
# of a 2-device run; ultralytics' own generate_ddp_command / generate_ddp_file (cloudpickle of
# the compressed trainer class with its options, of the model and of the callbacks); the
# generated script under `python -m torch.distributed.run --nproc_per_node 2`; in the workers
# the trainer's DDP path: _setup_train with world_size 2 (the DDP wrap, DistributedSampler,
# the EMA), validation with its EMA buffer broadcast, rank 0 saving; then the launcher loading
# best.pt. What does not (no GPUs here): the CUDA device selection and NCCL. On the CPU the
# trainer counts 0 devices, so both sides are told 2 (_cpu_ddp); the workers' _setup_ddp joins
# a gloo group instead of NCCL, and DDP gets no device_ids. The patch goes into the generated
# script as one import line, before the trainer is unpickled; the final validation of best.pt,
# which ultralytics runs on every rank, gets the CPU for the rank's CUDA device.
OUT_ENV = "VBXFX_TEST_DDP_OUT"
_MARK = "    from ultralytics.utils import DEFAULT_CFG_DICT\n"


class _CpuDDP(DistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, **kwargs)           # a CPU module takes no device_ids


def _cpu_ddp(setattr_, world_size):
    """Patch ultralytics (through ``setattr_``) to run its multi-GPU path on CPU processes."""
    from ultralytics.engine import trainer as engine
    from ultralytics.engine import validator
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.utils import LOCAL_RANK, RANK

    init = engine.BaseTrainer.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.world_size, self.ddp = world_size, LOCAL_RANK == -1   # device=0,1 would say so

    def _setup_ddp(self):
        dist.init_process_group("gloo", rank=RANK, world_size=self.world_size,
                                timeout=timedelta(seconds=300))

    setattr_(engine.BaseTrainer, "__init__", __init__)
    setattr_(engine.BaseTrainer, "_setup_ddp", _setup_ddp)
    setattr_(torch.nn.parallel, "DistributedDataParallel", _CpuDDP)
    # the final validation of best.pt on every rank: the rank's CUDA device becomes the CPU
    setattr_(validator, "get_torch_device_backend",
             lambda kind: SimpleNamespace(current_device=lambda: None))
    cpu = torch.device("cpu")
    setattr_(validator, "AutoBackend",
             lambda *args, **kwargs: AutoBackend(*args, **{**kwargs, "device": cpu}))


def cpu_ddp_worker():
    """Run by the generated DDP script (the line the launcher patch adds)."""
    torch.set_num_threads(1)
    _cpu_ddp(setattr, int(os.environ["WORLD_SIZE"]))


def record_patterns(trainer):
    """on_fit_epoch_end, on every rank: what the model and its EMA hold after the epoch."""
    rank = dist.get_rank()
    torch.save({"model": _patterns(vu._unwrap(trainer.model)), "ema": _patterns(trainer.ema.ema),
                "compressed_here": trainer.vbx_report is not None,
                "calib": (trainer.vbx_report or {}).get("calib"),
                "biases": {n: l.bias is not None
                           for n, l in compressed_modules(vu._unwrap(trainer.model))},
                "options": trainer.vbx_options,
                "weights": {n: l.weight.detach().clone()
                            for n, l in compressed_modules(vu._unwrap(trainer.model))}},
               Path(os.environ[OUT_ENV]) / f"rank{rank}_epoch{trainer.epoch}.pt")


@pytest.fixture
def ultralytics_launcher(monkeypatch, yolo_env):
    from ultralytics.utils import dist as ul_dist

    _cpu_ddp(monkeypatch.setattr, WORLD)
    real = ul_dist.generate_ddp_file

    def generate_ddp_file(trainer):
        file = real(trainer)
        text = Path(file).read_text()
        assert _MARK in text, "ultralytics' DDP script changed: update _MARK"
        Path(file).write_text(text.replace(_MARK, "    import test_ddp\n"
                                                  "    test_ddp.cpu_ddp_worker()\n" + _MARK))
        return file

    monkeypatch.setattr(ul_dist, "generate_ddp_file", generate_ddp_file)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return yolo_env


def _train_ddp_yolo(env, model, name, tmp_path, monkeypatch, calib=0, **options):
    from ultralytics import YOLO

    root, data = env
    out = tmp_path / name
    out.mkdir()
    monkeypatch.setenv(OUT_ENV, str(out))
    y = YOLO(model)
    y.add_callback("on_fit_epoch_end", record_patterns)
    # SGD steps from the first batch on (no warmup, no accumulation), so the patterns move
    steps = dict(epochs=2, optimizer="SGD", lr0=0.05, warmup_epochs=0, nbs=TRAIN["batch"])
    y.train(data=str(data), project=str(root / "runs"), name=name,
            **{**TRAIN, **steps, **options},
            trainer=vu.compressed_trainer(0.66, refresh_every=1, calib=calib))
    ranks = [[torch.load(out / f"rank{r}_epoch{e}.pt", weights_only=False) for e in range(2)]
             for r in range(WORLD)]
    return y, root / "runs" / name / "weights", ranks


def _check_ranks(ranks, calib=0):
    for epoch in range(2):
        r0, r1 = ranks[0][epoch], ranks[1][epoch]
        _assert_same_patterns(r0["model"], r1["model"], f"epoch {epoch} model")
        _assert_same_patterns(r0["ema"], r1["ema"], f"epoch {epoch} EMA")
        _assert_same_patterns(r0["model"], r0["ema"], f"epoch {epoch} EMA follows")
        for name in r0["weights"]:
            _assert_equal(r0["weights"][name], r1["weights"][name], f"epoch {epoch} {name}")
    first, second = ranks[0]
    assert len(first["model"]) >= 60
    # the trainer class reached the workers with its options (cloudpickle, by value)
    assert [r[0]["options"] for r in ranks] == [vu.CompressOptions(0.66, refresh_every=1,
                                                                   calib=calib)] * WORLD
    # refresh_every=1: every step refreshed, and the patterns moved, the same way on both ranks
    assert all(second["model"][n]["version"] >= first["model"][n]["version"] + 2
               for n in first["model"])
    # (a refit writes zeros at the pruned positions: refreshes then keep its patterns)
    assert calib or any(not torch.equal(first["model"][n]["mask"], second["model"][n]["mask"])
                        for n in first["model"])


@pytest.mark.slow
def test_yolo_ddp_workers_compress_on_rank_0_and_train_alike(ultralytics_launcher, tmp_path,
                                                              monkeypatch):
    """A .yaml: each worker builds the model (ultralytics seeds rank 1 differently); rank 0
    compresses, rank 1 takes its layers and patterns; rank 0 saves a compressed best.pt."""
    y, weights, ranks = _train_ddp_yolo(ultralytics_launcher, "yolov8n.yaml", "ddp_yaml",
                                        tmp_path, monkeypatch)
    _check_ranks(ranks)
    assert [r[0]["compressed_here"] for r in ranks] == [True, False]
    for ckpt in ("last.pt", "best.pt"):
        loaded = _checkpoint_model(weights / ckpt)
        assert set(dict(compressed_modules(loaded))) == set(ranks[0][1]["model"]), ckpt
        assert all(_fits(loaded).values()), ckpt
    assert len(dict(compressed_modules(y.model))) >= 60      # the launcher loaded best.pt


@pytest.mark.slow
def test_yolo_ddp_with_calib_refits_on_every_rank_and_trains_alike(ultralytics_launcher,
                                                                   tmp_path, monkeypatch):
    """calib=4 under DDP: every rank refits (each gives every compressed layer a bias, so the
    ranks hold the same parameters for the wrap), rank 0's patterns and weights win."""
    _, weights, ranks = _train_ddp_yolo(ultralytics_launcher, "yolov8n.yaml", "ddp_calib",
                                        tmp_path, monkeypatch, calib=4)
    _check_ranks(ranks, calib=4)
    assert ranks[0][0]["calib"]["method"] == "sequential" and ranks[0][0]["calib"]["images"] == 4
    assert all(all(r[0]["biases"].values()) for r in ranks)
    best = _checkpoint_model(weights / "best.pt")
    assert all(layer.bias is not None for _, layer in compressed_modules(best))


@pytest.mark.slow
def test_yolo_ddp_from_a_pt_pickles_the_compressed_model_to_the_workers(ultralytics_launcher,
                                                                         tmp_path, monkeypatch):
    """A .pt: the launcher compresses (get_model) and ultralytics pickles trainer class and
    compressed model to the workers, which train it as it came."""
    from ultralytics import YOLO

    dense = tmp_path / "dense.pt"
    YOLO("yolov8n.yaml").save(dense)
    _, weights, ranks = _train_ddp_yolo(ultralytics_launcher, str(dense), "ddp_pt", tmp_path,
                                        monkeypatch)
    _check_ranks(ranks)
    assert [r[0]["compressed_here"] for r in ranks] == [False, False]   # it came compressed
    best = _checkpoint_model(weights / "best.pt")
    assert set(dict(compressed_modules(best))) == set(ranks[0][1]["model"])
    assert all(_fits(best).values())
    assert not is_compressed(best.model[22].dfl.conv)
