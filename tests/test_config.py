"""The typed configuration: presets, validation, the checkpoint's plain dict, version-1 checkpoints, and the
settings of earlier versions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lib import checkpoint
import sample
import train
from lib.config import PRESETS, Config, settings
from lib.errors import UsageError
from conftest import TINY_TRAIN, one_line_error
from unet import ContextUnet

# The config dict of a version-1 checkpoint, as train.py wrote it before the config was typed.
V1_CONFIG = {"T": 8, "n_feat": 8, "epochs": 2, "batch_size": 16, "lr": 1e-3, "beta_start": 1e-3, "beta_end": 0.2,
             "p_uncond": 0.1, "ema_decay": 0.995, "guidance": 2.0, "grid_rows": 1, "grid_steps": 8, "seed": 0,
             "in_channels": 1, "n_classes": 10, "dataset": "mnist", "preset": "default"}


def test_presets_are_configs_and_the_default_is_the_original_run():
    default = PRESETS["default"].flat()
    assert (default["T"], default["n_feat"], default["epochs"], default["batch_size"], default["lr"]) == (
        500, 128, 20, 256, 1e-4)  # the earlier README's run
    cpu = PRESETS["cpu"].flat()  # README: the CPU preset's recipe
    assert {k: cpu[k] for k in ("n_feat", "batch_size", "epochs", "train_images", "prediction", "cond_encoder",
                                "optimizer", "beta_end", "p_uncond")} == {
        "n_feat": 32, "batch_size": 64, "epochs": 8, "train_images": 10_000, "prediction": "v", "cond_encoder": 1,
        "optimizer": "muon", "beta_end": 0.02, "p_uncond": 0.3}
    assert set(PRESETS) == {"default", "cpu"} and PRESETS["cpu"].preset == "cpu"
    for preset in PRESETS.values():
        assert preset.validate() is preset


def test_setting_names_are_unique_and_each_has_help_and_a_rule():
    names = [f.name for part in ("model", "diffusion", "training")
             for f in dataclasses.fields(getattr(Config(), part))]
    assert len(names) == len(set(names)) == len(settings())
    for _, f in settings().values():
        assert f.metadata["help"] and f.metadata["rule"]


def test_the_command_line_settings_are_train_flags():
    args = train.parse_args(["--n-feat", "16", "--T", "40", "--lr", "0.01", "--p-uncond", "0.2"])
    assert train.explicit_settings(args) == {"n_feat": 16, "T": 40, "lr": 0.01, "p_uncond": 0.2}
    flags = {name for name, (_, f) in settings().items() if f.metadata["flag"]}
    assert flags == {"T", "n_feat", "epochs", "batch_size", "lr", "prediction", "optimizer", "p_uncond", "seed"}


@pytest.mark.parametrize("change, words", [
    ({"n_feat": 12}, "multiple of 8"), ({"T": 0}, "--T must be a positive integer"),
    ({"beta_start": 0.3, "beta_end": 0.2}, "beta_start <= beta_end"), ({"p_uncond": 1.0}, "--p-uncond"),
    ({"lr": -1.0}, "--lr"), ({"image_size": 30}, "multiple of 4"), ({"prediction": "x0"}, "one of eps, v"),
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
    assert old.diffusion.T == 8 and old.model.n_feat == 8 and old.training.grid_rows == 1
    # settings that came later take the values that reproduce what the old code did
    later = {"image_size": 28, "cond_encoder": 0, "prediction": "eps", "optimizer": "adam", "train_images": 0}
    assert old.flat() == {k: v for k, v in V1_CONFIG.items() if k in old.flat()} | later
    assert not config_removed(V1_CONFIG)


def config_removed(stored: dict, sampling: bool = False) -> list[str]:
    from lib.config import removed_settings

    return removed_settings(stored, sampling)


@pytest.mark.parametrize("setting, value, samples", [
    ("self_cond", 1, True), ("schedule", "cosine", True), ("prediction", "x0", True), ("mid_blocks", 2, True),
    ("loss_weight", "min-snr", False), ("ema_gamma", 16.0, False), ("adam_beta2", 0.99, False),
])
def test_a_checkpoint_of_a_removed_setting_is_refused_in_one_line_naming_it(trained_run, tmp_path, capsys, setting,
                                                                            value, samples):
    """A setting that changed the network or its schedule: refused for sampling and for resuming; one that only
    changed the training: samples (its network is of the kind this version builds), refused for resuming."""
    ckpt = torch.load(trained_run["checkpoint"], weights_only=True)
    part = {"self_cond": "model", "mid_blocks": "model", "schedule": "diffusion", "prediction": "diffusion"}
    ckpt["config"][part.get(setting, "training")][setting] = value
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    path = str(out / "checkpoints" / "ddpm_8_8.pt")
    torch.save(ckpt, path)
    words = f"{path!r} was trained with --{setting.replace('_', '-')} {value}, a setting this version no longer has"
    assert sample.main(["--checkpoint", path, "--n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]) == (
        2 if samples else 0)
    if samples:
        assert words in one_line_error(capsys)
    capsys.readouterr()
    assert train.main(TINY_TRAIN + ["--data-root", trained_run["data"], "--out-dir", str(out), "--resume"]) == 2
    assert words in one_line_error(capsys)


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
        assert torch.equal(ddpm.model.state_dict()[key], value)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ddpm.model(x, torch.tensor([3, 5]), torch.tensor([1, 2])),
                                   net.eval()(x, torch.tensor([3, 5]), torch.tensor([1, 2])), rtol=0, atol=0)
    npz = str(tmp_path / "x.npz")
    assert sample.main(["--checkpoint", path, "--n", "1", "--steps", "3", "--npz", npz,
                        "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 0


def test_a_version_1_checkpoint_resumes(tmp_path, fake_mnist):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    write_v1_checkpoint(str(out / "checkpoints" / "ddpm_8_8.pt"))
    args = ["--resume", "--epochs", "3", "--data-root", fake_mnist, "--out-dir", str(out), "--device", "cpu",
            "--T", "8", "--n-feat", "8"]
    assert train.main(args) == 2  # --epochs 3 contradicts the stored 2: refused, as for any checkpoint
    assert train.main(args[:1] + args[3:]) == 0  # nothing left to train: loads, writes nothing new
    assert checkpoint.load_checkpoint(str(out / "checkpoints" / "ddpm_8_8.pt"))["epoch"] == 2
