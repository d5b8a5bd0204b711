"""tools/study.py end to end on a tiny fake MNIST: every configuration trained, measured and tabled."""

from __future__ import annotations

import os

from tools import study
from conftest import one_line_error


def test_study_trains_measures_and_reruns_without_training(fake_mnist, tmp_path, capsys):
    out = str(tmp_path / "runs")
    args = ["--T", "8", "10", "--n-feat", "8", "--preset", "cpu", "--epochs", "2", "--eval-n", "2",
            "--data-root", fake_mnist, "--out-dir", out, "--classifier-cache", str(tmp_path / "clf.pt"),
            "--device", "cpu"]
    assert study.main(args) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 + 1  # header, two configurations, the real-data floor
    assert table[1].startswith("| 8 | 8 | 2 |") and table[2].startswith("| 10 | 8 | 2 |")
    assert all(row.count("|") == table[0].count("|") for row in table)
    assert "%" in table[1].split("|")[12]  # the epoch-1 model, kept after its epoch, was scored too
    with open(os.path.join(out, "study.md")) as f:
        assert "| 10 | 8 | 2 |" in f.read()

    checkpoint = os.path.join(out, "checkpoints", "ddpm_8_8.pt")
    before = os.stat(checkpoint).st_mtime_ns
    assert args[:3] == ["--T", "8", "10"]
    assert study.main(args[:2] + ["8"] + args[3:]) == 0  # T=8 (twice: once), measured again, not retrained
    assert os.stat(checkpoint).st_mtime_ns == before
    captured = capsys.readouterr()
    assert captured.err.count("already trained") == 1
    assert len([line for line in captured.out.splitlines() if line.startswith("| 8 | 8 |")]) == 1
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "ddpm_10_8.pt", "ddpm_8_8.pt", "early_epoch1_10_8.pt", "early_epoch1_8_8.pt"]

    longer = args[:2] + ["8"] + args[3:]
    longer[longer.index("--epochs") + 1] = "3"
    assert study.main(longer) == 2  # another configuration's run is refused, not started over
    assert "is a run of another configuration (epochs 2, not 3)" in one_line_error(capsys)
    assert os.stat(checkpoint).st_mtime_ns == before


def test_confusions_name_the_most_frequent_mistakes():
    import torch

    labels = torch.tensor([6, 6, 6, 6, 0, 0, 0, 0])
    predicted = torch.tensor([8, 8, 6, 6, 0, 8, 0, 0])
    assert study.confusions(predicted, labels) == [(6, 8, 0.5), (0, 8, 0.25)]


def test_study_bad_width_is_one_line(tmp_path, capsys):
    assert study.main(["--n-feat", "12", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiple of 8" in err
    assert not os.path.exists(tmp_path / "x")
