"""The typed configuration: presets, validation, the checkpoint's plain dict, and version-1 checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import checkpoint
import sample
import train
from config import PRESETS, Config, UsageError, settings
from unet import ContextUnet

# The config dict of a version-1 checkpoint, as train.py wrote it before the config was typed.
V1_CONFIG = {"T": 8, "n_feat": 8, "epochs": 2, "batch_size": 16, "lr": 1e-3, "beta_start": 1e-3, "beta_end": 0.2,
             "p_uncond": 0.1, "ema_decay": 0.995, "guidance": 2.0, "grid_rows": 1, "grid_steps": 8, "seed": 0,
             "in_channels": 1, "n_classes": 10, "dataset": "mnist", "preset": "default"}


def test_presets_are_configs_and_the_default_is_the_ancestors_run():
    default = PRESETS["default"].flat()
    assert (default["T"], default["n_feat"], default["epochs"], default["batch_size"], default["lr"]) == (
        500, 128, 20, 256, 1e-4)
    old = PRESETS["cpu-2020"]
    assert isinstance(old, Config) and old.model.n_feat == 32 and old.training.batch_size == 64
    assert [old.flat()[k] for k in ("beta_end", "prediction", "optimizer", "epochs")] == [0.04, "eps", "adam", 20]
    cpu = PRESETS["cpu"]
    assert (cpu.model.n_feat, cpu.training.batch_size, cpu.training.epochs, cpu.preset) == (32, 64, 8, "cpu")
    # 8 epochs of 157 steps at batch 64: 40% of the 2020 recipe's 3,140 steps
    assert cpu.training.epochs * cpu.training.batch_size <= 0.4 * old.training.epochs * old.training.batch_size
    for preset in PRESETS.values():
        assert preset.validate() is preset


def test_setting_names_are_unique_and_each_has_help_and_a_rule():
    names = [f.name for part in ("model", "diffusion", "training")
             for f in dataclasses.fields(getattr(Config(), part))]
    assert len(names) == len(set(names)) == len(settings())
    for _, f in settings().values():
        assert f.metadata["help"] and f.metadata["rule"]


def test_every_command_line_setting_is_a_train_flag():
    args = train.parse_args(["--n-feat", "16", "--T", "40", "--lr", "0.01", "--p-uncond", "0.2"])
    assert train.explicit_settings(args) == {"n_feat": 16, "T": 40, "lr": 0.01, "p_uncond": 0.2}
    flags = {name for name, (_, f) in settings().items() if f.metadata["flag"]}
    assert flags == set(PRESETS["default"].flat()) - {"image_size", "in_channels", "n_classes"}


@pytest.mark.parametrize("change, words", [
    ({"n_feat": 12}, "multiple of 8"), ({"T": 0}, "--T must be a positive integer"),
    ({"beta_start": 0.3, "beta_end": 0.2}, "--beta-start <= --beta-end"), ({"p_uncond": 1.0}, "--p-uncond"),
    ({"ema_decay": 1.5}, "--ema-decay"), ({"grid_steps": 600}, "at most T=500"), ({"lr": -1.0}, "--lr"),
    ({"image_size": 30}, "multiple of 4"),
])
def test_validation_is_one_line_naming_the_setting(change, words):
    with pytest.raises(UsageError, match=words.replace("+", "\\+")):
        Config().override(**change).validate()


def test_override_refuses_unknown_names():
    with pytest.raises(TypeError, match="colour"):
        Config().override(colour="red")


def test_dict_round_trip_and_version_1_flat_dict():
    config = PRESETS["cpu"].override(T=100, seed=3, dataset="fashion-mnist")
    stored = config.to_dict()
    assert set(stored) == {"model", "diffusion", "training", "dataset", "preset"}
    assert Config.from_dict(stored) == config
    old = Config.from_dict(V1_CONFIG)
    assert old.diffusion.T == 8 and old.model.n_feat == 8 and old.training.grid_steps == 8
    # settings that came later take the values that reproduce what the old code did
    later = {"image_size": 28, "cond_encoder": 0, "ada_norm": 0, "mid_blocks": 0, "self_cond": 0, "schedule": "linear",
             "prediction": "eps", "lr_schedule": "epoch-linear", "warmup": 0, "loss_weight": "uniform",
             "snr_gamma": 5.0, "t_sampling": "uniform", "log_sigma_mean": -1.2, "log_sigma_std": 1.2,
             "snr_floor": 1.0, "adam_beta2": 0.999, "grad_clip": 0.0, "noise_pairing": "random",
             "noise_candidates": 64, "optimizer": "adam", "muon_lr_mult": 2.0, "ema_gamma": 8.0,
             "train_images": 0}
    assert old.flat() == {k: v for k, v in V1_CONFIG.items() if k not in ("dataset", "preset")} | later


def write_v1_checkpoint(path: str) -> ContextUnet:
    """A checkpoint in the version-1 format (flat config), with seeded weights; returns its network."""
    torch.manual_seed(0)
    net = ContextUnet(1, 8, 10)
    optimizer = torch.optim.Adam(net.parameters())
    torch.save({"format": "conditional-ddpm-mnist", "version": 1, "config": V1_CONFIG, "model": net.state_dict(),
                "ema": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2,
                "losses": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "train_seconds": 1.5}, path)
    return net


def test_a_version_1_checkpoint_loads_and_samples_the_same(tmp_path):
    path = str(tmp_path / "ddpm_8_8.pt")
    net = write_v1_checkpoint(path)
    ddpm, ckpt = checkpoint.load_sampler(path, torch.device("cpu"))
    assert ckpt["config"] == Config.from_dict(V1_CONFIG) and ckpt["epoch"] == 2
    for key, value in net.state_dict().items():
        assert torch.equal(ddpm.eps_model.state_dict()[key], value)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ddpm.eps_model(x, torch.tensor([3, 5]), torch.tensor([1, 2])),
                                   net.eval()(x, torch.tensor([3, 5]), torch.tensor([1, 2])), rtol=0, atol=0)
    npz = str(tmp_path / "x.npz")
    assert sample.main(["--checkpoint", path, "--n", "1", "--steps", "3", "--npz", npz,
                        "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 0


def test_a_version_1_checkpoint_resumes(tmp_path, fake_mnist):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    write_v1_checkpoint(str(out / "checkpoints" / "ddpm_8_8.pt"))
    args = ["--resume", "--epochs", "3", "--data-root", fake_mnist, "--out-dir", str(out), "--device", "cpu",
            "--no-download", "--T", "8", "--n-feat", "8"]
    assert train.main(args) == 2  # --epochs 3 contradicts the stored 2: refused, as for any checkpoint
    assert train.main(args[:1] + args[3:]) == 0  # nothing left to train: loads, writes nothing new
    assert checkpoint.load_checkpoint(str(out / "checkpoints" / "ddpm_8_8.pt"))["epoch"] == 2


def test_the_loss_plot_names_what_the_loss_measures():
    import training

    assert training.loss_label(PRESETS["default"]) == "MSE loss (noise)"
    assert training.loss_label(PRESETS["cpu"]) == "MSE loss (v)"
    assert training.loss_label(PRESETS["cpu"].override(loss_weight="min-snr")) == "MSE loss (v, Min-SNR weighted)"
