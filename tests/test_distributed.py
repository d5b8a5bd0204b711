"""Two processes on one CPU (gloo) train as one process would: torchrun and torch.multiprocessing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib import checkpoint
import sample
import train
from lib import training
from lib.config import Config
from conftest import TINY_TRAIN, train_tiny, write_fake_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32, so that the only difference between 1 and 2 processes is the order of float sums
FP32_TRAIN = TINY_TRAIN + ["--plain"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return train_tiny(tmp_path_factory.mktemp("one"), FP32_TRAIN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_training(a: dict, b: dict) -> None:
    """Two checkpoints of the same configuration hold the same run, up to float summation order.

    Compared by what the networks compute, not weight by weight: a conv bias followed by GroupNorm has
    no effect and a zero gradient, and Adam turns the float noise in that zero into steps of size ``lr``.
    """
    assert a["epoch"] == b["epoch"] and len(a["losses"]) == len(b["losses"])
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=1e-5)
    x = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t, y = torch.arange(10) % 8, torch.arange(10)
    for weights in ("model", "ema"):
        nets = []
        for ckpt in (a, b):
            net = checkpoint.build_ddpm(Config.from_dict(ckpt["config"])).model
            net.load_state_dict(ckpt[weights])
            nets.append(net.eval())
        with torch.no_grad():
            torch.testing.assert_close(nets[0](x, t, y), nets[1](x, t, y), rtol=1e-3, atol=1e-3)


def test_torchrun_two_processes_train_like_one(one_process, tmp_path):
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), *FP32_TRAIN, "--data-root", one_process["data"], "--out-dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch 16 = 2 processes x ~8" in result.stderr
    assert result.stderr.count("epoch 2/2: loss") == 1  # rank 0 alone reports
    written = sorted(os.path.relpath(os.path.join(base, f), out) for base, _, files in os.walk(out) for f in files)
    assert written == ["DDMP_generated_samples_8_8/samples_epoch1_8_8.png",
                       "DDMP_generated_samples_8_8/samples_epoch2_8_8.png",
                       "checkpoints/ddpm_8_8.pt", "loss_plot_8_8.png"]
    ckpt = torch.load(os.path.join(out, "checkpoints", "ddpm_8_8.pt"), weights_only=True)
    assert_same_training(ckpt, torch.load(one_process["checkpoint"], weights_only=True))
    png = str(tmp_path / "s.png")  # and sample.py reads it as it reads any checkpoint
    assert sample.main(["--checkpoint", os.path.join(out, "checkpoints"), "--steps", "2", "--out", png,
                        "--device", "cpu"]) == 0


def _rank(rank: int, world: int, port: int, argv: list[str], report: str) -> None:
    """One process of a 2-process run that is 'killed' after epoch 1, checking weights after every step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real_step, real_epoch, gaps, epochs = training.train_step, training.train_epoch, [], []

    def checked_step(state, *args, **kwargs):
        loss = real_step(state, *args, **kwargs)
        mine = torch.cat([p.detach().reshape(-1) for p in state.ddpm.model.parameters()])  # any layout
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        gaps.append(max((p - every[0]).abs().max().item() for p in every))
        return loss

    def epoch_then_die(*args, **kwargs):
        if epochs:
            raise KeyboardInterrupt  # on every rank, right after epoch 1 and its checkpoint
        epochs.append(1)
        return real_epoch(*args, **kwargs)

    training.train_step, training.train_epoch = checked_step, epoch_then_die
    status = train.main(argv)
    with open(f"{report}.{rank}", "w") as f:
        json.dump({"status": status, "gaps": gaps}, f)


def test_ranks_stay_identical_and_a_distributed_checkpoint_resumes_in_one_process(one_process, tmp_path):
    out, report = str(tmp_path / "cut"), str(tmp_path / "report")
    argv = FP32_TRAIN + ["--data-root", one_process["data"], "--out-dir", out]
    mp.spawn(_rank, args=(2, free_port(), argv, report), nprocs=2, join=True)
    for rank in (0, 1):
        with open(f"{report}.{rank}") as f:
            result = json.load(f)
        assert result["status"] == 130 and len(result["gaps"]) == 4  # 64 images / global batch 16
        assert max(result["gaps"]) == 0.0  # the two ranks' weights are identical after every step
    assert torch.load(checkpoint.checkpoint_path(out, "8_8"), weights_only=True)["epoch"] == 1
    assert train.main(argv + ["--resume"]) == 0  # one process continues the 2-process run
    resumed = torch.load(checkpoint.checkpoint_path(out, "8_8"), weights_only=True)
    assert_same_training(resumed, torch.load(one_process["checkpoint"], weights_only=True))


def test_global_batch_is_split_without_loss(tmp_path):
    from lib.data import batches, load_dataset
    from lib.distributed import Shard

    data = write_fake_mnist(str(tmp_path / "data"), n_train=37)

    images, labels = load_dataset(data, download=False)
    whole = list(batches(images, labels, 16, torch.Generator().manual_seed(0)))
    parts = [list(batches(images, labels, 16, torch.Generator().manual_seed(0), part=Shard(rank, 2).part))
             for rank in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat((x0, x1)), x) and torch.equal(torch.cat((y0, y1)), y)
    assert [len(y) for y, in [(p[-1][1],) for p in parts]] == [3, 2]  # the last batch of 5 splits 3 + 2
