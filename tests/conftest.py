"""Shared fixtures: a tiny fake MNIST in torchvision's on-disk layout, and tiny settings."""

from __future__ import annotations

import contextlib
import os
import struct
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One thread: the models are tiny, and on a busy 2-core machine two OpenMP threads wait on each other
# (tests/test_speed.py and tests/test_config.py: 57 s with two threads, 7 s with one, under load)
torch.set_num_threads(1)

# train.py flags that make a run of the CPU preset's recipe take seconds
TINY_TRAIN = ["--preset", "cpu", "--T", "8", "--n-feat", "8", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3",
              "--device", "cpu"]


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format MNIST ships in (magic 0x08 = unsigned byte)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images where class k is a bright bar at row 2k, plus a little noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 30, size=(n, 28, 28))
    for i, k in enumerate(labels):
        images[i, 2 * k + 4: 2 * k + 7, 4:24] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_fake_mnist(root: str, n_train: int = 64, n_test: int = 32, folder: str = "MNIST") -> str:
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
    return root


@pytest.fixture
def fake_mnist(tmp_path) -> str:
    return write_fake_mnist(str(tmp_path / "data"))


def train_tiny(root, flags: list[str] = TINY_TRAIN, folder: str = "MNIST") -> dict:
    """Train on a fresh fake dataset under ``root``; the data root, output folder and checkpoint path."""
    import train

    data = write_fake_mnist(str(root / "data"), folder=folder)
    out = str(root / "out")
    assert train.main(flags + ["--data-root", data, "--out-dir", out]) == 0
    return {"data": data, "out": out, "checkpoint": os.path.join(out, "checkpoints", "ddpm_8_8.pt")}


@contextlib.contextmanager
def all_cores():
    """Every core for one of the suite's few large jobs (the tiny models above run on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_line_error(capsys) -> str:
    """What a CLI printed on stderr, asserted to be one line and no traceback (the bad-input contract)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One tiny finished training run, shared by the tests that only read it."""
    return train_tiny(tmp_path_factory.mktemp("run"))
