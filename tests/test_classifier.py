"""The independent classifier: caching, staleness and scoring of sample.py's NPZ files."""

from __future__ import annotations

import os

import numpy as np
import pytest

import classifier
from conftest import fake_digits, write_fake_mnist


def test_cache_is_used_then_rebuilt_when_data_changes(tmp_path, monkeypatch):
    data = write_fake_mnist(str(tmp_path / "data"), n_train=200)
    cache = str(tmp_path / "cache" / "clf.pt")
    model, info = classifier.load_or_train(data, cache, epochs=3)
    assert os.path.isfile(cache) and info["train_size"] == 200 and info["test_size"] == 32
    assert info["test_accuracy"] > 0.5  # the fake classes are easy bars

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(classifier, "train_classifier", must_not_train)
    _, again = classifier.load_or_train(data, cache, epochs=3)
    assert again["test_accuracy"] == info["test_accuracy"]

    write_fake_mnist(data, n_train=210)  # new training files: the cache is stale
    with pytest.raises(AssertionError, match="cache"):
        classifier.load_or_train(data, cache, epochs=3)


def test_score_npz_and_cli(tmp_path, capsys):
    data = write_fake_mnist(str(tmp_path / "data"), n_train=200)
    cache = str(tmp_path / "clf.pt")
    images, labels = fake_digits(40, seed=5)
    npz = str(tmp_path / "gen.npz")
    np.savez(npz, images=images, labels=labels.astype(np.int64))
    assert classifier.main(["--data-root", data, "--cache", cache, "--epochs", "3", "--npz", npz]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "of 40 labelled as requested" in out

    model, _ = classifier.load_or_train(data, cache, epochs=3)
    wrong = str(tmp_path / "wrong.npz")
    np.savez(wrong, images=images, labels=(labels.astype(np.int64) + 1) % 10)
    assert classifier.score_npz(model, npz)["accuracy"] > classifier.score_npz(model, wrong)["accuracy"]


def test_unreadable_npz_is_one_line(tmp_path, capsys):
    data = write_fake_mnist(str(tmp_path / "data"), n_train=100)
    bad = tmp_path / "bad.npz"
    bad.write_text("not an npz")
    args = ["--data-root", data, "--cache", str(tmp_path / "c.pt"), "--epochs", "1", "--npz", str(bad)]
    assert classifier.main(args) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
