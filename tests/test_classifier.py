"""The classifier files: the bundled one used as it is, a cache trained on first use (saying so), rebuilt when
its data changes, and any other file left alone."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lib import checkpoint
from lib import classifier
import evaluate
from conftest import one_line_error, write_fake_mnist
from tools import train_classifier


def must_not_train(*args, **kwargs):
    raise AssertionError("a classifier was trained")


def test_cache_is_used_then_rebuilt_when_data_changes(tmp_path, monkeypatch, capsys):
    data = write_fake_mnist(str(tmp_path / "data"), n_train=200)
    cache = str(tmp_path / "cache" / "clf.safetensors")
    model, info = classifier.load_or_train(data, cache, epochs=3)
    assert os.path.isfile(cache) and info["train_size"] == 200 and info["test_size"] == 32
    assert info["test_accuracy"] > 0.5  # the fake classes are easy bars: far above the 10% of a guess
    with monkeypatch.context() as patch:
        patch.setattr(classifier, "train_classifier", must_not_train)
        _, again = classifier.load_or_train(data, cache, epochs=3)
    assert again == info
    write_fake_mnist(data, n_train=210)  # new training files: the cache is out of date
    capsys.readouterr()
    _, rebuilt = classifier.load_or_train(data, cache, epochs=3)
    assert rebuilt["train_size"] == 210
    assert "is out of date (its training files have changed); training it again" in capsys.readouterr().err


def test_the_bundled_classifier_is_used_as_it_is(tmp_path, monkeypatch):
    if not os.path.isfile(classifier.BUNDLED):
        pytest.skip("no bundled classifier in this copy of the project")
    data = write_fake_mnist(str(tmp_path / "data"))  # other training files than it was trained on
    before = open(classifier.BUNDLED, "rb").read()
    monkeypatch.setattr(classifier, "train_classifier", must_not_train)
    _, info = classifier.load_or_train(data, classifier.BUNDLED)
    assert classifier.default_classifier("mnist") == classifier.BUNDLED
    # its test accuracy on the official 10,000 test digits, recorded when it was made
    assert info["test_size"] == 10_000 and info["test_accuracy"] > 0.99
    assert open(classifier.BUNDLED, "rb").read() == before


def test_first_use_says_that_it_trains_and_shows_progress(tmp_path, capsys):
    data = write_fake_mnist(str(tmp_path / "data"), n_train=100)
    cache = str(tmp_path / "clf.safetensors")
    assert train_classifier.main(["--data-root", data, "--cache", cache, "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("training a mnist classifier")]
    assert said == [f"training a mnist classifier on the 100 training images of {data!r} (minutes on a CPU; "
                    f"once: it is kept in {cache!r})"]
    assert "classifier: 100%" in err  # the progress bar, to its end


@pytest.fixture
def tiny_weights(tmp_path) -> str:
    """A file that is not a classifier: a model's weights file (what a user might pass by mistake)."""
    bundled = checkpoint.bundled_path()
    if not os.path.isfile(bundled):
        pytest.skip("no bundled model in this copy of the project")
    return shutil.copyfile(bundled, tmp_path / "model.safetensors")


@pytest.mark.parametrize("content", ["text", "torch", "model weights"])
def test_a_file_that_is_not_a_classifier_cache_is_never_replaced(trained_run, tmp_path, monkeypatch, capsys,
                                                                 tiny_weights, content):
    data, cache = trained_run["data"], tmp_path / "clf.pt"
    if content == "text":
        cache.write_bytes(b"my notes, not a checkpoint")
    elif content == "torch":
        torch.save({"model": {}, "notes": torch.zeros(3)}, cache)
    else:
        shutil.copyfile(tiny_weights, cache)
    before = cache.read_bytes()
    monkeypatch.setattr(classifier, "train_classifier", must_not_train)
    for run in (lambda: evaluate.main(["--checkpoint", trained_run["checkpoint"], "--data-root", data, "--n", "2",
                                       "--classifier-cache", str(cache)]),
                lambda: train_classifier.main(["--data-root", data, "--cache", str(cache)])):
        assert run() == 2
        err = one_line_error(capsys)
        assert f"{str(cache)!r} is not a classifier this project can use" in err and "left as it is" in err
        assert cache.read_bytes() == before


def test_missing_data_is_one_line(tmp_path, capsys):
    assert train_classifier.main(["--data-root", str(tmp_path / "none"), "--cache", str(tmp_path / "c.pt")]) == 2
    assert "MNIST files not found" in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "c.pt")
