"""The independent classifier: caching, staleness and scoring of sample.py's NPZ files."""

from __future__ import annotations

import os

import pytest

import classifier
from conftest import write_fake_mnist


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


def test_corrupt_cache_is_rebuilt_and_cli_reports(tmp_path, capsys):
    data = write_fake_mnist(str(tmp_path / "data"), n_train=100)
    cache = tmp_path / "clf.pt"
    cache.write_bytes(b"not a checkpoint")
    assert classifier.main(["--data-root", data, "--cache", str(cache), "--epochs", "1"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert classifier.load_or_train(data, str(cache), epochs=1)[1]["train_size"] == 100


def test_missing_data_is_one_line(tmp_path, capsys):
    assert classifier.main(["--data-root", str(tmp_path / "none"), "--cache", str(tmp_path / "c.pt")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
