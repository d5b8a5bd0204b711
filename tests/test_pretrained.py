"""The weights file and the bundled model: export, loading, which checkpoint is used, that the bundled model
draws the digits asked for, and the docs' links."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lib import checkpoint
from lib import classifier
from lib import weights_io
import evaluate
import sample
import train
from lib.errors import UsageError
from conftest import TINY_TRAIN, all_cores, one_line_error
from lib.data import to_uint8
from lib.distributed import SINGLE
from lib.samplers import Sampling, generate
from lib.samplers import sample as sample_batch
from tools import export_weights
from lib.speed import PLAIN
from lib.training import build_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> str:
    """The tiny trained run's checkpoint as a weights file."""
    path = str(tmp_path_factory.mktemp("weights") / "tiny.safetensors")
    export_weights.export_weights(trained_run["checkpoint"], path, "a tiny test model")
    return path


@pytest.fixture
def bundled(exported, tmp_path, monkeypatch) -> str:
    """A project folder whose bundled model is the exported tiny model."""
    here = tmp_path / "project"
    os.makedirs(here / "pretrained")
    shutil.copyfile(exported, here / "pretrained" / "mnist.safetensors")
    monkeypatch.setattr(checkpoint, "HERE", str(here))
    return str(here / "pretrained" / "mnist.safetensors")


def test_weights_file_holds_config_and_half_precision_ema_only(trained_run, exported):
    with safe_open(exported, "pt") as f:  # read by the safetensors package itself, not the project's loader
        meta, saved = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    source = torch.load(trained_run["checkpoint"], weights_only=True)
    assert (meta["format"], meta["kind"]) == (checkpoint.FORMAT, "weights") and len(meta["sha256"]) == 64
    assert json.loads(meta["config"]) == source["config"] and json.loads(meta["epoch"]) == source["epoch"] == 2
    assert meta["about"] == "a tiny test model" and json.loads(meta["steps"]) == len(source["losses"])
    assert json.loads(meta["final_loss"]) == pytest.approx(sum(source["losses"][-4:]) / 4)
    assert set(saved) == set(source["ema"])
    for key, value in saved.items():
        assert torch.equal(value, source["ema"][key].half())
    assert os.path.getsize(exported) < os.path.getsize(trained_run["checkpoint"]) / 3


def copy_with(path: str, target: str, at: int | str, flip: int = 0x01) -> str:
    """A copy of ``path`` with one byte XOR-ed with ``flip``: at offset ``at``, or (a string) inside its first
    occurrence."""
    data = bytearray(open(path, "rb").read())
    offset = at if isinstance(at, int) else data.index(at.encode()) + 2
    data[offset] ^= flip
    with open(target, "wb") as f:
        f.write(data)
    return target


@pytest.mark.parametrize("where", ["a weight", "the last byte", "its description", "its config",
                                   "the header's length", "a tensor's shape"])
def test_a_weights_file_with_a_flipped_byte_is_refused(exported, tmp_path, capsys, where):
    size = os.path.getsize(exported)
    at = {"a weight": size // 2, "the last byte": size - 1, "its description": "a tiny test model",
          "its config": 'n_feat', "the header's length": 1, "a tensor's shape": '"shape"'}[where]
    damaged = copy_with(exported, str(tmp_path / "damaged.safetensors"), at)
    assert sample.main(["--checkpoint", damaged, "--out", str(tmp_path / "x.png")]) == 2
    err = one_line_error(capsys)
    assert repr(damaged) in err and ("damaged" in err or "not a safetensors file" in err), err
    assert not os.path.exists(tmp_path / "x.png")


def test_a_copy_of_the_bundled_model_with_a_flipped_byte_is_refused(tmp_path, capsys):
    path, _ = bundled_or_skip()
    damaged = copy_with(path, str(tmp_path / "copy.safetensors"), os.path.getsize(path) // 2)  # inside a weight
    assert sample.main(["--checkpoint", damaged, "--digit", "7", "--out", str(tmp_path / "x.png")]) == 2
    assert one_line_error(capsys) == (f"sample.py: error: cannot use {damaged!r}: its contents do not match its "
                                      "sha256 (the file is damaged)")
    assert not os.path.exists(tmp_path / "x.png")


def forged(path: str, config: dict, ema: dict | None = None) -> str:
    """A weights file with a valid checksum whose config or weights are what the caller says."""
    weights_io.write(path, ema or {"w": torch.zeros(2, dtype=torch.float16)},
                     {"format": checkpoint.FORMAT, "kind": "weights", "config": json.dumps(config)})
    return path


@pytest.mark.parametrize("part, key, value, words", [
    ("model", "n_feat", 4096, "--n-feat must be at most 512, got 4,096"),
    ("diffusion", "T", 2_000_000_000, "--T must be at most 10,000, got 2,000,000,000"),
    ("model", "n_classes", 10**9, "must be at most 1,000"),
])
def test_a_file_whose_config_asks_for_too_much_is_refused_before_allocating(trained_run, tmp_path, capsys,
                                                                            part, key, value, words):
    config = torch.load(trained_run["checkpoint"], weights_only=True)["config"]
    config = {**config, part: {**config[part], key: value}}
    weights = forged(str(tmp_path / "big.safetensors"), config)
    training_file = str(tmp_path / "big.pt")
    torch.save({**torch.load(trained_run["checkpoint"], weights_only=True), "config": config}, training_file)
    for path in (weights, training_file):
        assert sample.main(["--checkpoint", path, "--out", str(tmp_path / "x.png")]) == 2
        err = one_line_error(capsys)
        assert repr(path) in err and words in err, err


def test_nan_weights_are_refused(trained_run, exported, tmp_path, capsys):
    with safe_open(exported, "pt") as f:
        meta, ema = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    first = next(iter(ema))
    ema[first] = ema[first].clone().fill_(float("nan"))
    weights = forged(str(tmp_path / "nan.safetensors"), json.loads(meta["config"]), ema)
    ckpt = torch.load(trained_run["checkpoint"], weights_only=True)
    ckpt["ema"][first] = ckpt["ema"][first].clone().fill_(float("inf"))
    training_file = str(tmp_path / "nan.pt")
    torch.save(ckpt, training_file)
    for path in (weights, training_file):
        assert sample.main(["--checkpoint", path, "--out", str(tmp_path / "x.png")]) == 2
        assert "holds NaN or infinite weights" in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "x.png")


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_exported_weights_sample_exactly_as_the_half_precision_ema(trained_run, exported, sampler):
    ddpm, ckpt = checkpoint.load_sampler(exported, torch.device("cpu"))
    assert all(v.dtype == torch.float32 for v in ddpm.model.state_dict().values() if v.is_floating_point())
    reference, source = checkpoint.load_sampler(trained_run["checkpoint"], torch.device("cpu"))
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in source["ema"].items()}
    reference.model.load_state_dict(rounded)
    y, how = torch.tensor([0, 3, 7, 9]), Sampling(sampler)
    a = sample_batch(ddpm, y, how, torch.Generator().manual_seed(0))
    b = sample_batch(reference, y, how, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    unrounded, _ = checkpoint.load_sampler(trained_run["checkpoint"], torch.device("cpu"))
    c = sample_batch(unrounded, y, how, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, c, rtol=0, atol=0.05)  # float16 storage moves the pixels very little


def test_export_command_writes_a_new_file_and_never_overwrites(trained_run, tmp_path, capsys):
    out = str(tmp_path / "sub" / "w.safetensors")
    args = [trained_run["checkpoint"], out]
    assert export_weights.main(args + ["--about", "one epoch on a laptop"]) == 0
    assert "float16" in capsys.readouterr().err
    assert checkpoint.load_checkpoint(out)["about"] == "one epoch on a laptop"
    before = open(out, "rb").read()
    assert export_weights.main(args) == 2
    assert "already exists" in one_line_error(capsys) and open(out, "rb").read() == before
    assert not [name for name in os.listdir(tmp_path / "sub") if name != "w.safetensors"]


def test_export_default_about_says_how_it_was_trained(trained_run, tmp_path):
    saved = export_weights.export_weights(trained_run["checkpoint"], str(tmp_path / "w.safetensors"))
    assert saved["about"].startswith("mnist, T=8, n_feat=8, preset cpu, 2 epochs of batch 16")
    assert "\n" not in saved["about"]


@pytest.mark.parametrize("args, words", [
    (["missing.pt", "w.st"], "no checkpoint"),
    (["empty", "w.st"], "no checkpoint in"),
    (["TRAINED", "blocker/w.st"], "cannot write"),
    (["TRAINED"], "the following arguments are required: out"),
])
def test_export_bad_input(trained_run, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    os.makedirs("empty")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    args = [trained_run["checkpoint"] if a == "TRAINED" else a for a in args]
    assert export_weights.main(args) == 2
    assert words in one_line_error(capsys) and not os.path.exists("w.st")


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
    _, err = draw(capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0] == (f"using the bundled model {bundled} (a tiny test model); "
                                            "train your own with 'python train.py --preset cpu --data-root DATA'")
    os.makedirs("checkpoints/classifier")  # what evaluate.py leaves: the classifier cache is no checkpoint
    shutil.copyfile(bundled, "checkpoints/classifier/classifier_fashion-mnist.safetensors")
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
            "--device", "cpu"]
    assert evaluate.main(args) == 0
    captured = capsys.readouterr()
    assert f"using the bundled model {bundled} (a tiny test model)" in captured.err
    assert "real training digits" in captured.out


def bundled_or_skip() -> tuple[str, str]:
    """The bundled model and classifier of this copy of the project."""
    path = checkpoint.bundled_path()
    if not (os.path.isfile(path) and os.path.isfile(classifier.BUNDLED)):
        pytest.skip("no bundled model or classifier in this copy of the project")
    return path, classifier.BUNDLED


def read_back(ddpm, per_class: int) -> torch.Tensor:
    """``(10, per_class)``: whether the bundled classifier reads each digit drawn by the default sampler (seed 0)
    as the digit asked for, one row per digit."""
    labels = torch.arange(10).repeat(per_class)
    x = generate(ddpm, labels, Sampling().resolve(ddpm.T), seed=0, batch_size=len(labels))
    model, _ = classifier.read_classifier(classifier.BUNDLED)
    return (classifier.predict(model, to_uint8(x)) == labels).view(per_class, 10).T


def draws_the_digits_asked_for(correct: torch.Tensor) -> bool:
    """At least 95% of all digits, and 8 in 10 of every digit, read as the digit asked for."""
    return correct.float().mean().item() >= 0.95 and correct.float().mean(1).min().item() >= 0.8


def test_the_bundled_model_draws_the_digits_asked_for():
    path, _ = bundled_or_skip()
    ddpm, _ = checkpoint.load_sampler(path, torch.device("cpu"))
    with all_cores():
        correct = read_back(ddpm, per_class=10)
    assert draws_the_digits_asked_for(correct), correct.sum(1).tolist()


@pytest.mark.parametrize("weights", ["random", "an EMA never updated"])
def test_an_untrained_model_fails_the_same_check(weights):
    """The check above can fail: a network with random weights, or the EMA a run starts from (what a run whose
    EMA is never updated would save), draws blobs that the classifier cannot read as the digits asked for."""
    path, _ = bundled_or_skip()
    config = checkpoint.load_checkpoint(path)["config"]
    if weights == "random":
        torch.manual_seed(1)
        network = None
    else:
        network = build_state(config, torch.device("cpu"), PLAIN, SINGLE, None)[0].ema
    correct = read_back(checkpoint.build_ddpm(config, network).eval(), per_class=2)
    assert not draws_the_digits_asked_for(correct) and correct.float().mean().item() < 0.5


def test_fresh_clone_draws_sevens_from_the_bundled_model(tmp_path):
    path, _ = bundled_or_skip()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--digit", "7", "--n", "4",
                             "--out", "x.png", "--npz", "x.npz", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    model, _ = classifier.read_classifier(classifier.BUNDLED)
    images = torch.from_numpy(np.load(tmp_path / "x.npz")["images"])
    assert classifier.predict(model, images).tolist() == [7] * 4 and (tmp_path / "x.png").exists()
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
