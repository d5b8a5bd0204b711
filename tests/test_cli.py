"""train.py and sample.py end to end on a tiny fake MNIST (torchvision's real loader, no network)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lib import checkpoint
import sample
import train
from lib import training
from conftest import TINY_TRAIN, one_line_error, write_fake_mnist
from lib import samplers
from lib.config import PRESETS
from lib.data import load_dataset
from lib.samplers import Sampling
from lib.samplers import sample as sample_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fake_mnist_reads_through_torchvision(fake_mnist):
    images, labels = load_dataset(fake_mnist, train=True, download=False)
    assert images.shape == (64, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (64,) and labels[:10].tolist() == list(range(10))


def test_train_writes_every_promised_file(trained_run):
    out = trained_run["out"]
    for epoch in (1, 2):
        grid = os.path.join(out, "DDMP_generated_samples_8_8", f"samples_epoch{epoch}_8_8.png")
        with Image.open(grid) as image:  # one row of digits 0..9, 28 px plus 2 px padding each
            assert image.size == (10 * 30 + 2, 30 + 2)
            assert np.asarray(image)[0, 0] == 255  # white background, as in the original README's pictures
    assert os.path.getsize(os.path.join(out, "loss_plot_8_8.png")) > 1000
    ckpt = torch.load(trained_run["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["losses"]) == 2 * 4  # 64 images / batch 16
    assert {"model", "ema", "optimizer", "config", "losses", "epoch"} <= set(ckpt)
    assert ckpt["config"]["diffusion"]["T"] == 8 and ckpt["config"]["model"]["n_feat"] == 8
    assert not [f for f in os.listdir(os.path.join(out, "checkpoints")) if f.startswith(".tmp")]


def test_checkpoint_round_trip_gives_identical_outputs(trained_run, tmp_path):
    ddpm, ckpt = checkpoint.load_sampler(trained_run["checkpoint"], torch.device("cpu"))
    copy = str(tmp_path / "copy.pt")
    checkpoint.save_checkpoint(copy, **{k: v for k, v in ckpt.items() if k not in ("format", "version")})
    assert checkpoint.load_checkpoint(copy)["config"] == ckpt["config"]
    again, _ = checkpoint.load_sampler(copy, torch.device("cpu"))
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 7]), torch.tensor([1, 5, 10])
    with torch.no_grad():
        torch.testing.assert_close(ddpm.model(x, t, y), again.model(x, t, y), rtol=0, atol=0)
    a = sample_batch(ddpm, y[:2], Sampling("ddpm"), torch.Generator().manual_seed(0))
    b = sample_batch(again, y[:2], Sampling("ddpm"), torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_one_digit_grid_and_npz(trained_run, tmp_path):
    out, npz = str(tmp_path / "sevens.png"), str(tmp_path / "sevens.npz")
    args = ["--checkpoint", trained_run["checkpoint"], "--digit", "7", "--n", "12", "--out", out, "--npz", npz,
            "--device", "cpu", "--seed", "3"]
    assert sample.main(args) == 0
    data = np.load(npz)
    assert data["images"].shape == (12, 28, 28) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [7] * 12 and np.issubdtype(data["labels"].dtype, np.integer)
    with Image.open(out) as image:
        assert image.size == (10 * 30 + 2, 2 * 30 + 2)
    first = data["images"].copy()
    assert sample.main(args) == 0  # same seed, same images
    np.testing.assert_array_equal(np.load(npz)["images"], first)


@pytest.mark.parametrize("how", [["--sampler", "ddpm"], ["--steps", "4"], ["--sampler", "ddim", "--steps", "4"],
                                 ["--sampler", "dpm++", "--steps", "3"]])
def test_sample_with_each_sampler(trained_run, tmp_path, how):
    npz = str(tmp_path / "x.npz")
    args = ["--checkpoint", trained_run["checkpoint"], "--n", "1", "--npz", npz, "--out", str(tmp_path / "x.png")]
    assert sample.main(args + how) == 0
    first = np.load(npz)["images"]
    assert sample.main(args + how) == 0
    np.testing.assert_array_equal(np.load(npz)["images"], first)


def test_sample_every_digit_from_newest_checkpoint(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained_run["out"])
    out = str(tmp_path / "all.png")
    assert sample.main(["--n", "2", "--out", out, "--guidance", "0"]) == 0
    assert f"from {os.path.join('checkpoints', 'ddpm_8_8.pt')} (epoch 2) -> {out}" in capsys.readouterr().err
    with Image.open(out) as image:  # two rows of the ten digits
        assert image.size == (10 * 30 + 2, 2 * 30 + 2)


@pytest.mark.parametrize("optimizer", ["adam", "muon"])
def test_resume_continues_where_it_stopped(tmp_path, monkeypatch, optimizer):
    data = write_fake_mnist(str(tmp_path / "data"))
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    tiny_train = TINY_TRAIN + ["--optimizer", optimizer]
    assert train.main(tiny_train + ["--data-root", data, "--out-dir", full]) == 0

    real_save = training.save_checkpoint

    def save_then_die(path, config, **fields):  # the process is killed right after epoch 1's checkpoint
        real_save(path, config, **fields)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    assert train.main(tiny_train + ["--data-root", data, "--out-dir", cut]) == 130
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert torch.load(checkpoint.checkpoint_path(cut, "8_8"), weights_only=True)["epoch"] == 1
    assert train.main(tiny_train + ["--data-root", data, "--out-dir", cut, "--resume"]) == 0

    a = torch.load(checkpoint.checkpoint_path(full, "8_8"), weights_only=True)
    b = torch.load(checkpoint.checkpoint_path(cut, "8_8"), weights_only=True)
    assert b["epoch"] == 2 and a["losses"] == b["losses"] and b["config"]["training"]["optimizer"] == optimizer
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=0)
    assert os.path.exists(os.path.join(cut, "DDMP_generated_samples_8_8", "samples_epoch2_8_8.png"))


def test_the_cpu_preset_trains_on_the_first_images_it_names(tmp_path, monkeypatch, capsys):
    data = write_fake_mnist(str(tmp_path / "data"))  # 64 training images
    out = str(tmp_path / "out")
    monkeypatch.setitem(PRESETS, "cpu", PRESETS["cpu"].override(train_images=40))
    assert train.main(TINY_TRAIN + ["--data-root", data, "--out-dir", out]) == 0
    assert "training on 40 images" in capsys.readouterr().err
    ckpt = torch.load(checkpoint.checkpoint_path(out, "8_8"), weights_only=True)
    assert len(ckpt["losses"]) == 2 * 3 and ckpt["config"]["training"]["train_images"] == 40  # 40 = 16 + 16 + 8
    assert train.resolve_config(train.parse_args([])).training.train_images == 0  # the default run: all


def test_resume_refuses_another_preset_sharing_the_checkpoint(tmp_path, capsys):
    data = write_fake_mnist(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    tiny = [*TINY_TRAIN, "--data-root", data, "--out-dir", out]
    assert train.main(tiny + ["--epochs", "1"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert train.main(["--preset", "default", *tiny[2:], "--epochs", "1", "--resume"]) == 2
    assert "--preset default differs from the checkpoint's cpu" in one_line_error(capsys)
    assert snapshot(out) == before


def snapshot(folder: str) -> dict[str, tuple[int, bytes]]:
    found = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                found[path] = (os.stat(path).st_mtime_ns, f.read())
    return found


@pytest.mark.parametrize("args, words", [
    (["--digit", "10"], "--digit"),
    (["--digit", "-1"], "--digit"),
    (["--n", "0"], "--n"),
    (["--guidance", "-1"], "--guidance"),
    (["--checkpoint", "missing.pt"], "no checkpoint"),
    (["--checkpoint", "corrupt.pt"], "cannot read checkpoint"),
    (["--checkpoint", "foreign.pt"], "not a checkpoint written by train.py"),
    (["--out", "blocker/sub/x.png"], "cannot write"),
    (["--device", "cuda:7"], "--device"),
    (["--steps", "9"], "between 1 and T=8"),
    (["--sampler", "ddpm", "--steps", "4"], "always takes all T steps"),
    (["--gif", "x.gif", "--guidance-grid", "1", "2"], "does not go with --guidance-grid"),
    (["--interpolate", "3", "12", "--out", "newdir/x.png"], "--interpolate"),
    (["--out", "x.jpg", "--checkpoint", "missing.pt"], "--out writes a PNG file: give a name ending in .png"),
    (["--out", "somedir", "--checkpoint", "missing.pt"], "--out 'somedir' is a folder"),
    (["--gif", "x.png"], "name ending in .gif"),
    (["--npz", "somedir"], "is a folder"),
])
def test_sample_bad_input(trained_run, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    os.makedirs("somedir")  # a folder where a file should be; missing.pt: the --out checks come before loading
    if "--checkpoint" not in args:
        args = args + ["--checkpoint", trained_run["checkpoint"]]
    before = snapshot(trained_run["out"])
    assert sample.main(args + ["--out", "kept.png"] if "--out" not in args else args) == 2
    assert words in one_line_error(capsys)
    assert snapshot(trained_run["out"]) == before and not os.path.exists("kept.png")
    assert not os.path.exists("newdir")  # refused before any output folder is made


@pytest.mark.parametrize("args, words", [
    (["--T", "0"], "--T"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--n-feat", "12"], "multiple of 8"),
    (["--lr", "abc"], "--lr"),
    (["--out-dir", "blocker/out"], "cannot write"),
    (["--data-root", "nowhere"], "MNIST files not found"),
    (["--resume", "--out-dir", "empty"], "no checkpoint"),
    (["--out-dir", "RUN"], "already exists"),
    (["--name", "../up"], "--name must be letters"),
    (["--resume", "--out-dir", "RUN", "--lr", "0.5"], "differs from the checkpoint"),
    (["--resume", "--overwrite", "--out-dir", "RUN"], "not allowed with"),
    (["--train-images", "-1"], "--train-images"),
])
def test_train_bad_input(trained_run, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    args = [trained_run["out"] if a == "RUN" else a for a in args]
    base = TINY_TRAIN + (["--data-root", trained_run["data"]] if "--data-root" not in args else [])
    base += [] if "--out-dir" in args else ["--out-dir", "fresh"]
    before = snapshot(trained_run["out"])
    assert train.main(base + args) == 2
    assert words in one_line_error(capsys)
    assert snapshot(trained_run["out"]) == before


def test_missing_data_with_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    import torchvision

    def no_network(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    args = [a for a in TINY_TRAIN if a != "--no-download"]
    assert train.main(args + ["--data-root", str(tmp_path / "d"), "--out-dir", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert "could not download" in err and os.path.join("MNIST", "raw") in err


@pytest.mark.parametrize("script, args", [  # the in-process tests above check the messages; here, the process
    ("sample.py", ["--digit", "10", "--checkpoint", "nothing.pt"]),
    ("train.py", ["--T", "0"]),
])
def test_real_process_exit_status(tmp_path, script, args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_registered_sampler_is_a_choice_of_sample_py_with_its_defaults(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(samplers.SAMPLERS, "halfway", samplers.SamplerInfo(samplers.ddim, "a test sampler", 3, 0.0))
    npz = str(tmp_path / "h.npz")
    assert sample.main(["--checkpoint", trained_run["checkpoint"], "--sampler", "halfway", "--n", "1",
                        "--npz", npz, "--out", str(tmp_path / "h.png")]) == 0
    assert np.load(npz)["images"].shape == (10, 28, 28)
    assert Sampling("halfway").resolve(8).describe() == "halfway 3 steps, guidance 2"


def test_readme_names_every_sampler_and_the_default():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert all(f"`{name}`" in text for name in ("ddpm", "ddim", "dpm++"))
    assert "DPM-Solver++(2M), 20 steps" in text  # the default, as tests/test_samplers.py pins it


@pytest.mark.parametrize("epoch, step, words", [
    (1, 0, "is from an unfinished run (1 of 2 epochs done); expect rough digits, or noise; finish it with its "
           "train.py command and --resume (e.g. 'python train.py --preset cpu --data-root DATA --resume')"),
    (0, 3, "is from an unfinished run (0 of 2 epochs done)"),
    (2, 0, "was trained for only 8 steps; expect rough digits, or noise (--preset cpu trains 1,256: "
           "'python train.py --preset cpu --data-root DATA')"),
])
def test_sample_says_when_its_model_is_from_an_unfinished_or_short_run(trained_run, tmp_path, capsys, epoch, step,
                                                                       words):
    ckpt = torch.load(trained_run["checkpoint"], weights_only=True)
    path = str(tmp_path / "ddpm_8_8.pt")
    torch.save({**ckpt, "epoch": epoch, "step": step}, path)
    assert sample.main(["--checkpoint", path, "--n", "1", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {path} {words}"] if epoch else len(notes) == 1 and words in notes[0]
