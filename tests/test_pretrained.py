"""The weights file and the bundled model: export, loading, which checkpoint is used, and the docs' links."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import sample
import train
from config import UsageError
from conftest import TINY_TRAIN, one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> str:
    """The tiny trained run's checkpoint as a weights file."""
    path = str(tmp_path_factory.mktemp("weights") / "tiny.pt")
    checkpoint.export_weights(trained_run["checkpoint"], path, "a tiny test model")
    return path


@pytest.fixture
def bundled(exported, tmp_path, monkeypatch) -> str:
    """A project folder whose ``pretrained/mnist.pt`` is the exported tiny model."""
    here = tmp_path / "project"
    os.makedirs(here / "pretrained")
    shutil.copyfile(exported, here / "pretrained" / "mnist.pt")
    monkeypatch.setattr(checkpoint, "HERE", str(here))
    return str(here / "pretrained" / "mnist.pt")


def test_weights_file_holds_config_and_half_precision_ema_only(trained_run, exported):
    saved = torch.load(exported, weights_only=True)
    source = torch.load(trained_run["checkpoint"], weights_only=True)
    assert saved["format"] == checkpoint.FORMAT and saved["kind"] == "weights"
    assert not {"model", "optimizer", "losses"} & set(saved)
    assert saved["config"] == source["config"] and saved["epoch"] == source["epoch"] == 2
    assert saved["about"] == "a tiny test model" and saved["steps"] == len(source["losses"])
    assert saved["final_loss"] == pytest.approx(sum(source["losses"][-4:]) / 4)
    assert set(saved["ema"]) == set(source["ema"])
    for key, value in saved["ema"].items():
        assert value.dtype == (torch.float16 if source["ema"][key].is_floating_point() else source["ema"][key].dtype)
    assert os.path.getsize(exported) < os.path.getsize(trained_run["checkpoint"]) / 3


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_exported_weights_sample_exactly_as_the_half_precision_ema(trained_run, exported, sampler):
    ddpm, ckpt = checkpoint.load_sampler(exported, torch.device("cpu"))
    assert all(v.dtype == torch.float32 for v in ddpm.eps_model.state_dict().values() if v.is_floating_point())
    reference, source = checkpoint.load_sampler(trained_run["checkpoint"], torch.device("cpu"))
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in source["ema"].items()}
    reference.eps_model.load_state_dict(rounded)
    y = torch.tensor([0, 3, 7, 9])
    a = ddpm.sample(y, generator=torch.Generator().manual_seed(0), sampler=sampler)
    b = reference.sample(y, generator=torch.Generator().manual_seed(0), sampler=sampler)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    unrounded, _ = checkpoint.load_sampler(trained_run["checkpoint"], torch.device("cpu"))
    c = unrounded.sample(y, generator=torch.Generator().manual_seed(0), sampler=sampler)
    torch.testing.assert_close(a, c, rtol=0, atol=0.05)  # float16 storage moves the pixels very little


def test_export_command_writes_a_new_file_and_never_overwrites(trained_run, tmp_path, capsys):
    out = str(tmp_path / "sub" / "w.pt")
    args = ["--checkpoint", trained_run["checkpoint"], "--export-weights", out]
    assert sample.main(args + ["--about", "one epoch on a laptop"]) == 0
    assert "float16" in capsys.readouterr().err
    assert torch.load(out, weights_only=True)["about"] == "one epoch on a laptop"
    before = open(out, "rb").read()
    assert sample.main(args) == 2
    assert "already exists" in one_line_error(capsys) and open(out, "rb").read() == before
    assert not [name for name in os.listdir(tmp_path / "sub") if name != "w.pt"]


def test_export_default_about_says_how_it_was_trained(trained_run, tmp_path):
    saved = checkpoint.export_weights(trained_run["checkpoint"], str(tmp_path / "w.pt"))
    assert saved["about"].startswith("mnist, T=8, n_feat=8, preset default, 2 epochs of batch 16")
    assert "\n" not in saved["about"]


@pytest.mark.parametrize("args, words", [
    (["--export-weights", "w.pt", "--npz", "x.npz"], "drop --npz"),
    (["--export-weights", "w.pt", "--digit", "3"], "drop --digit"),
    (["--about", "text"], "--export-weights"),
    (["--export-weights", "w.pt", "--checkpoint", "missing.pt"], "no checkpoint"),
    (["--export-weights", "w.pt", "--checkpoint", "empty"], "no checkpoint in"),
    (["--export-weights", "blocker/w.pt", "--checkpoint", "TRAINED"], "cannot write"),
])
def test_export_bad_input(trained_run, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    os.makedirs("empty")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    args = [trained_run["checkpoint"] if a == "TRAINED" else a for a in args]
    assert sample.main(args) == 2
    assert words in one_line_error(capsys) and not os.path.exists("w.pt")


def test_weights_file_has_no_training_weights_and_cannot_resume(trained_run, exported, tmp_path, capsys):
    with pytest.raises(UsageError, match="only the EMA weights"):
        checkpoint.load_sampler(exported, torch.device("cpu"), weights="model")
    out = tmp_path / "out"
    os.makedirs(out / "checkpoints")
    shutil.copyfile(exported, out / "checkpoints" / "ddpm_8_8.pt")
    before = open(out / "checkpoints" / "ddpm_8_8.pt", "rb").read()
    assert train.main(TINY_TRAIN + ["--data-root", trained_run["data"], "--out-dir", str(out), "--resume"]) == 2
    assert "weights file" in one_line_error(capsys)
    assert open(out / "checkpoints" / "ddpm_8_8.pt", "rb").read() == before


def draw(capsys, *extra: str) -> tuple[list[int], str]:
    """``sample.py --digit 7 --n 2`` in the current folder: the labels written and stderr."""
    assert sample.main(["--digit", "7", "--n", "2", "--out", "x.png", "--npz", "x.npz", "--device", "cpu",
                        *extra]) == 0
    return np.load("x.npz")["labels"].tolist(), capsys.readouterr().err


def test_without_checkpoints_the_bundled_model_is_used_and_named(bundled, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    labels, err = draw(capsys)
    lines = err.strip().splitlines()
    assert labels == [7, 7] and len(lines) == 2
    assert lines[0] == (f"using the bundled model {bundled} (a tiny test model); "
                        "train your own with 'python train.py --preset cpu'")
    os.makedirs("checkpoints/classifier")  # what evaluate.py leaves: the classifier cache is no checkpoint
    shutil.copyfile(bundled, "checkpoints/classifier/classifier_mnist.pt")
    assert "using the bundled model" in draw(capsys)[1]


def test_a_trained_checkpoint_wins_over_the_bundled_model(bundled, trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("checkpoints")
    shutil.copyfile(trained_run["checkpoint"], "checkpoints/ddpm_8_8.pt")
    assert checkpoint.find_checkpoint(None) == (os.path.join("checkpoints", "ddpm_8_8.pt"), False)
    _, err = draw(capsys)
    assert "bundled" not in err and "from checkpoints/ddpm_8_8.pt" in err
    _, err = draw(capsys, "--checkpoint", "pretrained")  # unless the bundled one is asked for
    assert err.startswith(f"using the bundled model {bundled}")


def test_without_any_model_the_old_error_stays(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "HERE", str(tmp_path / "no-project"))
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--digit", "7"]) == 2
    assert "no checkpoint at 'checkpoints'; train one" in one_line_error(capsys)
    assert sample.main(["--digit", "7", "--checkpoint", "pretrained"]) == 2
    err = one_line_error(capsys)
    assert "bundled model" in err and "is missing" in err


def test_evaluate_falls_back_to_the_bundled_model(bundled, trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--data-root", trained_run["data"], "--n", "2", "--steps", "2", "--classifier-cache", "clf.pt",
            "--classifier-epochs", "1", "--device", "cpu"]
    assert evaluate.main(args) == 0
    captured = capsys.readouterr()
    assert f"using the bundled model {bundled} (a tiny test model)" in captured.err
    assert "real training digits" in captured.out


def test_fresh_clone_draws_sevens_from_the_bundled_model(tmp_path):
    path = os.path.join(ROOT, *checkpoint.BUNDLED["mnist"].split("/"))
    if not os.path.isfile(path):
        pytest.skip(f"no bundled model at {path} in this copy of the project")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--digit", "7", "--n", "4",
                             "--out", "x.png", "--npz", "x.npz", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "x.npz")["labels"].tolist() == [7] * 4 and (tmp_path / "x.png").exists()
    assert result.stderr.startswith(f"using the bundled model {path} (")
    assert not (tmp_path / "checkpoints").exists()


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(path: str) -> list[str]:
    """The targets of the markdown links and images in ``path`` that point into the repository."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    targets = [m.group(1).split("#")[0] for m in LINK.finditer(text)]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


def markdown_files() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    found = [os.path.join(docs, name) for name in sorted(os.listdir(docs))] if os.path.isdir(docs) else []
    return [os.path.join(ROOT, "README.md")] + [path for path in found if path.endswith(".md")]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_and_image_resolves(path):
    links = relative_links(path)
    missing = [t for t in links if not os.path.exists(os.path.join(os.path.dirname(path), t))]
    assert not missing, f"{os.path.relpath(path, ROOT)} links to missing files: {missing}"
    outside = [t for t in links if not os.path.abspath(os.path.join(os.path.dirname(path), t)).startswith(ROOT)]
    assert not outside, outside
