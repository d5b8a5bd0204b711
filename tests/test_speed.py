"""The fast-path switches: batches, flags, and the benchmark script."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lib import speed
import train
from lib import training
from conftest import TINY_TRAIN, write_fake_mnist
from lib.data import batches
from lib.optimizers import OPTIMIZERS, make_optimizer
from unet import ContextUnet


def test_batches_cover_the_data_once_in_a_seeded_order_and_resume_at_a_batch():
    images, labels = torch.randint(0, 256, (37, 28, 28), dtype=torch.uint8), torch.arange(37)
    walk = list(batches(images, labels, 8, torch.Generator().manual_seed(3)))
    assert [len(y) for _, y in walk] == [8, 8, 8, 8, 5]
    assert sorted(torch.cat([y for _, y in walk]).tolist()) == list(range(37))
    for x, y in walk:
        assert torch.equal(x, images[y])
    again = list(batches(images, labels, 8, torch.Generator().manual_seed(3), skip=3))
    assert [y.tolist() for _, y in again] == [y.tolist() for _, y in walk[3:]]


def test_the_fast_path_is_chosen_by_device_and_plain_turns_it_off(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(speed, "cpu_capability", lambda: "AVX2")
    chosen = train.speed_for(train.parse_args([]), cpu)
    assert chosen.fused_optimizer and chosen.log_every == 25 and not chosen.compile
    assert train.speed_for(train.parse_args(["--compile"]), cpu).compile
    assert train.speed_for(train.parse_args(["--plain", "--compile"]), cpu) == speed.PLAIN
    assert speed.default_speed(cpu).keep_freed_memory and not speed.default_speed(cuda, amp=False).keep_freed_memory
    for capability, amp, expected in (("AVX512", False, True), ("AVX512", True, False), ("AVX2", False, False)):
        monkeypatch.setattr(speed, "cpu_capability", lambda c=capability: c)
        assert speed.default_speed(cpu, amp=amp).channels_last is expected  # NHWC for fp32 on AVX-512 only
        assert not speed.default_speed(cuda, amp=amp).channels_last


def test_the_allocator_setting_is_made_only_on_the_fast_path(monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "keep_freed_memory", lambda: calls.append(1) or True)
    speed.prepare_process(speed.PLAIN)
    assert calls == []
    speed.prepare_process(speed.default_speed(torch.device("cpu")))
    assert calls == [1]


def test_plain_and_fast_runs_write_the_same_files(tmp_path):
    data = write_fake_mnist(str(tmp_path / "data"))
    for name, extra in (("plain", ["--plain"]), ("fast", [])):
        assert train.main(TINY_TRAIN + ["--data-root", data, "--out-dir", str(tmp_path / name)] + extra) == 0
    ckpts = [torch.load(os.path.join(tmp_path, name, "checkpoints", "ddpm_8_8.pt"), weights_only=True)
             for name in ("plain", "fast")]
    assert len(ckpts[0]["losses"]) == len(ckpts[1]["losses"]) == 8  # every step's loss, read back in groups
    assert sorted(os.listdir(tmp_path / "plain")) == sorted(os.listdir(tmp_path / "fast"))


def test_bench_runs(capsys):
    from tools import bench

    args = ["--T", "8", "--n-feat", "8", "--batch-size", "4", "--train-steps", "2", "--warmup", "1",
            "--sample-n", "4", "--sample-steps", "2", "--device", "cpu", "--ablate"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "| plain |" in out and "| fast |" in out and "fast / plain: training" in out
    assert "| fast path |" in out and "| plain path |" in out and "| fast path + channels_last |" in out
    assert "preset default, T=8 n_feat=8 batch 4" in out
    # timed before any variant makes the process-wide setting
    assert out.index("| without keep_freed_memory |") < out.index("| fast path |")
    assert out.index("| plain path |") < out.index("| fast path |")


def test_bench_counts_two_network_passes_where_guidance_applies():
    from lib.config import PRESETS
    from lib.samplers import Sampling
    from tools import bench

    config = PRESETS["default"]  # T = 500
    # sigma_t = sqrt((1 - a_bar_t) / a_bar_t) lies in the default interval (0.28, 5.42] for t = 59..409 on this
    # schedule (0.2775, 0.2822, 5.391 and 5.438 at t = 58, 59, 409, 410): 351 guided steps of 500
    assert bench.network_passes(config, Sampling("ddpm", guidance=2.0)) == 500 + 351
    assert bench.network_passes(config, Sampling("ddpm", guidance=1.0)) == 500
    assert bench.network_passes(config, Sampling("ddpm", guidance=2.0, interval=None)) == 1000
    assert bench.network_passes(config, Sampling("ddim", 20, guidance=0.5)) == 40  # below 1: every step
    assert bench.network_passes(config, Sampling("dpm++", 20, guidance=2.0)) == 31  # 11 of its 20 steps guided


def test_bench_times_a_presets_network(capsys):
    from tools import bench

    args = ["--preset", "cpu", "--T", "8", "--n-feat", "8", "--train-steps", "1", "--warmup", "1",
            "--sample-n", "2", "--sample-steps", "2", "--device", "cpu", "--threads", "1"]
    assert bench.main(args) == 0
    assert "1 threads; preset cpu, T=8 n_feat=8 batch 64" in capsys.readouterr().out


def test_bench_no_amp_times_the_fast_path_in_fp32(capsys, monkeypatch):
    from tools import bench

    monkeypatch.setattr(speed, "cpu_capability", lambda: "AVX2")
    args = ["--T", "8", "--n-feat", "8", "--batch-size", "4", "--train-steps", "1", "--warmup", "1",
            "--sample-n", "2", "--sample-steps", "2", "--device", "cpu", "--no-amp", "--ablate"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "fast: Speed(amp=False, channels_last=False, fused_optimizer=True" in out
    assert "| without amp |" not in out and "| fast path + channels_last |" in out

    monkeypatch.setattr(speed, "cpu_capability", lambda: "AVX512")
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "fast: Speed(amp=False, channels_last=True, fused_optimizer=True" in out
    assert "| without channels_last |" in out and "| fast path + channels_last |" not in out


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_resumed_optimizer_state_takes_the_parameters_layout(kind):
    # A checkpoint from an NCHW run resumed with channels-last weights: fused Adam (and Muon) must step as in NCHW.
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 5, 7]), torch.tensor([1, 2, 3, 4])
    fast = speed.Speed(fused_optimizer=True)
    net = ContextUnet(n_feat=8)
    optimizer = make_optimizer(net, 1e-2, fast, kind=kind)
    net(x, t, y).pow(2).mean().backward()
    optimizer.step()
    saved_net, saved_optimizer = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())

    outputs = []
    for channels_last in (False, True):
        resumed = ContextUnet(n_feat=8)
        resumed.load_state_dict(saved_net)
        speed.prepare_model(resumed, speed.Speed(channels_last=channels_last))
        optimizer = make_optimizer(resumed, 1e-2, fast, kind=kind)
        optimizer.load_state_dict(copy.deepcopy(saved_optimizer))  # Adam steps its state in place
        training.align_state_layout(optimizer)
        resumed(x, t, y).pow(2).mean().backward()
        optimizer.step()
        outputs.append(resumed(x, t, y).detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("saved_fused", [True, False])
def test_a_resumed_optimizer_uses_this_runs_fused_setting(kind, saved_fused):
    # load_state_dict restores the saved run's "fused"; the resumed run's own setting (--plain or not) must win.
    torch.manual_seed(0)
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 5, 7]), torch.tensor([1, 2, 3, 4])
    net = ContextUnet(n_feat=8)
    optimizer = make_optimizer(net, 1e-2, speed.Speed(fused_optimizer=saved_fused), kind=kind)
    net(x, t, y).pow(2).mean().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    now = not saved_fused
    optimizer = make_optimizer(net, 1e-2, speed.Speed(fused_optimizer=now), kind=kind)
    optimizer.load_state_dict(saved)
    assert {bool(g["fused"]) for g in optimizer.param_groups} == {saved_fused}  # what torch restores
    training.use_fused_kernel(optimizer, now)
    assert {bool(g["fused"]) for g in optimizer.param_groups} == {now}
    net(x, t, y).pow(2).mean().backward()
    optimizer.step()  # the step counts are where this kernel wants them
    assert all(s["step"].item() == 2 for s in optimizer.state.values() if "step" in s)


def test_bench_profile_shows_the_convolutions_share(capsys):
    from tools import bench

    args = ["--T", "8", "--n-feat", "8", "--batch-size", "4", "--train-steps", "2", "--warmup", "1",
            "--device", "cpu", "--threads", "1", "--profile"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "| aten::convolution_backward |" in out and "| fast |" not in out  # profiled instead of timed
    assert "convolutions, forward and backward: " in out
    # the FLOP count the rate is made of: every convolution, forward and backward, and nothing else
    config = bench.PRESETS["default"].override(T=8, n_feat=8)
    step = bench.training_flops(config, 4)[1]
    assert 0.99 * step < bench.convolution_flops(config, 4) < step


def test_bench_profile_is_for_cpus(capsys, monkeypatch):
    from tools import bench

    monkeypatch.setattr(bench, "pick_device", lambda name: torch.device("cuda"))
    assert bench.main(["--T", "8", "--n-feat", "8", "--device", "cuda", "--profile"]) == 2
    assert "--profile times CPU ops only; pass --device cpu" in capsys.readouterr().err
