"""Autoguidance by a weaker model (Karras et al. 2024): the formula, where it applies, and its flags."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import evaluate
import sample
from conftest import TINY_TRAIN, one_line_error, train_tiny
from ddpm import DDPM
from generation import Sampling
from unet import ContextUnet


def tiny(T: int = 10, seed: int = 0, n_feat: int = 8, **kwargs) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(ContextUnet(1, n_feat, 10), T=T, beta_start=1e-3, beta_end=0.2, **kwargs).eval()


def test_autoguidance_formula():
    ddpm, weak = tiny(seed=0), tiny(seed=1)
    x, t, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 6, 9]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cond, uncond = ddpm.eps_model(x, t, labels), ddpm.eps_model(x, t, torch.full_like(labels, 10))
        bad = weak.eps_model(x, t, labels)  # the weak model is asked for the same labels
        close = dict(rtol=1e-4, atol=1e-5)
        # s = 1: Karras et al.'s form, eps_weak + a (eps_cond - eps_weak)
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 1.0, weak, 3.0), bad + 3.0 * (cond - bad), **close)
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 2.0, weak, 2.0),
                                   uncond + 2.0 * (cond - uncond) + (cond - bad), **close)
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 0.0, weak, 2.0), uncond + (cond - bad), **close)


def test_autoguidance_off_never_asks_the_weak_model():
    ddpm, weak = tiny(seed=0), tiny(seed=1)
    weak.eps_model.forward = lambda *a: pytest.fail("the weak model was asked at a = 1")
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([2, 5]), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(ddpm.guided_eps(x, t, labels, 2.0, weak, 1.0), ddpm.guided_eps(x, t, labels, 2.0))


def test_weak_model_may_differ_in_width_and_target_but_not_in_schedule():
    ddpm = tiny()
    ddpm.check_weak(tiny(n_feat=16, prediction="v"))
    with pytest.raises(ValueError, match="noise schedule"):
        ddpm.check_weak(tiny(T=12))
    with pytest.raises(ValueError, match="noise schedule"):
        ddpm.check_weak(tiny(schedule="cosine"))
    with pytest.raises(ValueError, match="classes"):
        ddpm.check_weak(DDPM(ContextUnet(1, 8, 5), T=10, beta_start=1e-3, beta_end=0.2))


def draw(ddpm: DDPM, **kwargs) -> torch.Tensor:
    return ddpm.sample(torch.arange(4), guidance=1.5, generator=torch.Generator().manual_seed(0), steps=6, **kwargs)


def test_autoguidance_without_a_weak_model_is_refused():
    # silently drawing plain classifier-free samples would hide the caller's mistake
    with pytest.raises(ValueError, match="needs a weak model"):
        draw(tiny(), autoguidance=2.0)


def test_autoguidance_applies_inside_the_guidance_interval_only():
    ddpm, weak = tiny(seed=0), tiny(seed=1)
    plain = draw(ddpm, guidance_interval=None)
    guided = draw(ddpm, guidance_interval=None, weak=weak, autoguidance=2.0)
    assert (guided - plain).abs().max() > 1e-3
    nowhere = (1e6, 2e6)  # no step has a noise level in it: both guidances are off everywhere
    torch.testing.assert_close(draw(ddpm, guidance_interval=nowhere, weak=weak, autoguidance=2.0),
                               draw(ddpm, guidance_interval=nowhere))


def test_a_model_guided_by_itself_is_unchanged():
    ddpm = tiny()
    torch.testing.assert_close(draw(ddpm, weak=copy.deepcopy(ddpm), autoguidance=3.0, guidance_interval=None),
                               draw(ddpm, guidance_interval=None), rtol=1e-4, atol=1e-4)


def test_sampling_describes_its_autoguidance():
    assert Sampling(autoguidance=2.0).resolve(500).describe() == "dpm++ 20 steps, autoguidance 2"
    assert "autoguidance" not in Sampling().resolve(500).describe()


@pytest.fixture(scope="module")
def run_with_snapshot(tmp_path_factory) -> dict:
    run = train_tiny(tmp_path_factory.mktemp("snap"), TINY_TRAIN + ["--snapshot-epochs", "1"])
    run["weak"] = os.path.join(run["out"], "checkpoints", "snapshots", "ddpm_8_8_epoch1.pt")
    return run


def test_sample_with_an_earlier_snapshot_as_the_weak_model(run_with_snapshot, tmp_path, capsys):
    common = ["--checkpoint", run_with_snapshot["checkpoint"], "--n", "2", "--device", "cpu", "--guidance", "1.5"]
    npz = {name: str(tmp_path / f"{name}.npz") for name in ("plain", "auto")}
    assert sample.main(common + ["--out", str(tmp_path / "plain.png"), "--npz", npz["plain"]]) == 0
    assert sample.main(common + ["--out", str(tmp_path / "auto.png"), "--npz", npz["auto"], "--autoguidance", "2",
                                 "--weak-model", run_with_snapshot["weak"]]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "autoguidance 2" in last and "weak model" in last and "epoch1" in last
    with np.load(npz["plain"]) as plain, np.load(npz["auto"]) as auto:
        assert plain["images"].shape == auto["images"].shape == (20, 28, 28)
        assert (plain["labels"] == auto["labels"]).all()
        assert (plain["images"] != auto["images"]).any()


@pytest.mark.parametrize("args, words", [
    (["--autoguidance", "2"], "--autoguidance A needs --weak-model"),
    (["--weak-model", "WEAK"], "--weak-model is used only by --autoguidance"),
    (["--autoguidance", "0.5", "--weak-model", "WEAK"], "--autoguidance: expected a number >= 1"),
    (["--autoguidance", "2", "--weak-model", "missing.pt"], "no checkpoint"),
    (["--autoguidance", "2", "--weak-model", "OTHER_T"], "another noise schedule"),
])
def test_autoguidance_bad_input(run_with_snapshot, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    assert TINY_TRAIN[:2] == ["--T", "8"]
    other = train_tiny(tmp_path, ["--T", "6", *TINY_TRAIN[2:]]) if "OTHER_T" in args else None
    capsys.readouterr()
    names = {"WEAK": run_with_snapshot["weak"], "OTHER_T": other and other["out"] + "/checkpoints"}
    args = [names.get(a, a) for a in args]
    common = ["--checkpoint", run_with_snapshot["checkpoint"], "--device", "cpu"]
    assert sample.main(common + args + ["--out", "kept.png"]) == 2
    assert words in one_line_error(capsys)
    assert not os.path.exists("kept.png")
    assert evaluate.main(common + args + ["--data-root", "nowhere", "--classifier-cache", "none.pt"]) == 2
    assert words in capsys.readouterr().err


def test_evaluate_scores_a_row_per_guidance_and_autoguidance():
    args = evaluate.parse_args(["--guidance", "1.5", "2", "--autoguidance", "1", "2", "--weak-model", "w.pt"])
    rows = evaluate.sampler_settings(args, 500)
    assert [(r.guidance, r.autoguidance) for r in rows] == [(1.5, 1.0), (1.5, 2.0), (2.0, 1.0), (2.0, 2.0)]
    assert [r.describe().endswith("autoguidance 2") for r in rows] == [False, True, False, True]
