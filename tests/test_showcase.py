"""What the model learned, as pictures: interpolation, the reverse process, guidance grids, Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lib import checkpoint
import evaluate
import sample
import train
from conftest import TINY_TRAIN, write_fake_mnist
from lib.data import DATASETS, load_dataset
from lib.samplers import Sampling, blended_labels
from lib.samplers import sample as sample_batch


def run_sample(trained_run, tmp_path, *args: str) -> int:
    return sample.main(["--checkpoint", trained_run["checkpoint"], "--device", "cpu", *args])


def test_soft_labels_embed_as_the_blend_of_class_embeddings():
    from unet import ContextUnet

    model = ContextUnet(1, 8, 10)
    one_hot = torch.nn.functional.one_hot(torch.tensor([3, 10]), 11).float()
    torch.testing.assert_close(model.embed_labels(one_hot), model.embed_labels(torch.tensor([3, 10])), rtol=0, atol=0)
    half = torch.full((1, 11), 0.0)
    half[0, 2] = half[0, 7] = 0.5
    expected = 0.5 * (model.label_embedding.weight[2] + model.label_embedding.weight[7])
    torch.testing.assert_close(model.embed_labels(half)[0], expected)


def test_interpolation_ends_are_the_pure_classes(trained_run):
    ddpm, _ = checkpoint.load_sampler(trained_run["checkpoint"], torch.device("cpu"))
    labels = blended_labels(2, 5, 5, 10)
    assert labels.shape == (5, 11) and labels[2, 2] == labels[2, 5] == 0.5
    how = Sampling("ddim", 4, 1.0)
    row = sample_batch(ddpm, labels, how, torch.Generator().manual_seed(0), shared_noise=True)
    for index, digit in ((0, 2), (-1, 5)):
        pure = sample_batch(ddpm, torch.tensor([digit]), how, torch.Generator().manual_seed(0), shared_noise=True)
        torch.testing.assert_close(row[index], pure[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(row[0], row[-1], atol=1e-3)  # the label matters: the row changes along the way


def test_interpolate_command_writes_one_row(trained_run, tmp_path):
    out = str(tmp_path / "morph.png")
    assert run_sample(trained_run, tmp_path, "--interpolate", "6", "8", "--n", "9", "--out", out) == 0
    with Image.open(out) as image:
        assert image.size == (9 * 30 + 2, 30 + 2)


@pytest.mark.parametrize("steps, frames", [(30, 24), (6, 7)])  # 6 DDIM steps give 7 states
def test_gif_has_the_promised_frames(trained_run, tmp_path, steps, frames):
    gif = str(tmp_path / "d3.gif")
    args = ["--digit", "3", "--n", "2", "--sampler", "ddim", "--steps", str(min(steps, 8)), "--gif", gif,
            "--out", str(tmp_path / "s.png")]
    assert run_sample(trained_run, tmp_path, *args) == 0
    with Image.open(gif) as image:
        assert image.n_frames == min(frames, min(steps, 8) + 1) and image.size == (2 * 30 + 2, 30 + 2)


def test_frame_indices_keep_both_ends():
    assert sample.frame_indices(51, 24)[0] == 0 and sample.frame_indices(51, 24)[-1] == 50
    assert len(set(sample.frame_indices(51, 24))) == 24
    assert sample.frame_indices(7, 50) == list(range(7))


def test_guidance_grid_rows_share_their_noise(trained_run, tmp_path):
    out = str(tmp_path / "g.png")
    assert run_sample(trained_run, tmp_path, "--guidance-grid", "1", "4", "1", "--steps", "4", "--out", out) == 0
    with Image.open(out) as image:
        pixels = np.asarray(image)
    assert pixels.shape == (3 * 30 + 2, 10 * 30 + 2)
    first, second, third = (pixels[2 + 30 * r: 30 * (r + 1)] for r in range(3))
    assert (first == third).all() and not (first == second).all()


@pytest.mark.parametrize("args, words", [
    (["--interpolate", "3", "12"], "between 0 and 9"),
    (["--interpolate", "3", "4", "--n", "1"], "at least 2"),
    (["--interpolate", "3", "4", "--npz", "x.npz"], "does not go with --interpolate"),
    (["--guidance-grid", "1", "2", "--gif", "x.gif"], "does not go with --guidance-grid"),
    (["--interpolate", "3", "4", "--guidance-grid", "1"], "not allowed with"),
])
def test_showcase_bad_input(trained_run, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    assert run_sample(trained_run, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".png", ".gif", ".npz"))]


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> dict:
    """A tiny Fashion-MNIST run whose raw files are only .gz, as the Debian package ships them."""
    root = tmp_path_factory.mktemp("fashion")
    data = write_fake_mnist(str(root / "data"), folder="FashionMNIST")
    raw = os.path.join(data, "FashionMNIST", "raw")
    for name in os.listdir(raw):
        with open(os.path.join(raw, name), "rb") as src, gzip.open(os.path.join(raw, name + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(os.path.join(raw, name))
    out = str(root / "out")
    assert train.main(TINY_TRAIN + ["--dataset", "fashion-mnist", "--data-root", data, "--out-dir", out]) == 0
    return {"data": data, "out": out,
            "checkpoint": os.path.join(out, "checkpoints", "ddpm_fashion-mnist_8_8.pt")}


def test_fashion_mnist_reads_fake_idx_in_its_layout(fashion_run):
    images, labels = load_dataset(fashion_run["data"], train=True, download=False, name="fashion-mnist")
    assert images.shape == (64, 28, 28) and labels[:10].tolist() == list(range(10))


def test_fashion_run_writes_its_own_files_and_remembers_its_dataset(fashion_run):
    out = fashion_run["out"]
    grid = os.path.join(out, "DDMP_generated_samples_fashion-mnist_8_8", "samples_epoch2_fashion-mnist_8_8.png")
    with Image.open(grid) as image:  # drawn at twice the size under a row of class names
        assert image.size == (2 * (10 * 30 + 2), 2 * (30 + 2) + 16)
    assert os.path.exists(os.path.join(out, "loss_plot_fashion-mnist_8_8.png"))
    ckpt = torch.load(fashion_run["checkpoint"], weights_only=True)
    assert ckpt["config"]["dataset"] == "fashion-mnist"


def test_fashion_sample_refuses_a_class_it_does_not_have(fashion_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--checkpoint", fashion_run["checkpoint"], "--digit", "10", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fashion-mnist" in err and "9 Ankle boot" in err and len(err.splitlines()) == 1
    assert sample.main(["--checkpoint", fashion_run["checkpoint"], "--class", "9", "--n", "2", "--steps", "2",
                        "--device", "cpu", "--npz", "bags.npz"]) == 0
    assert str(np.load("bags.npz")["dataset"]) == "fashion-mnist"


def test_evaluate_uses_a_classifier_per_dataset(fashion_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", fashion_run["checkpoint"], "--data-root", fashion_run["data"], "--n", "2",
            "--steps", "2", "--device", "cpu"]
    assert evaluate.main(args) == 0
    captured = capsys.readouterr()
    assert "fashion-mnist classifier" in captured.out and "real training images" in captured.out
    cache = os.path.join("checkpoints", "classifier", "classifier_fashion-mnist.safetensors")
    assert os.path.exists(cache)  # the first use trained it, and said so in one line before its progress bar
    said = [line for line in captured.err.splitlines() if "classifier" in line and "%" not in line]
    assert said == [f"training a fashion-mnist classifier on the 64 training images of {fashion_run['data']!r} "
                    f"(minutes on a CPU; once: it is kept in {cache!r})"]
    assert DATASETS["fashion-mnist"].class_names[9] == "Ankle boot"
