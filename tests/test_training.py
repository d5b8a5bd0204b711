"""The training loop's EMA, followed step by step against its definition, and what the files keep of it."""

from __future__ import annotations

import pytest
import torch

from lib import checkpoint
import train
from lib import training
from tools import export_weights
from conftest import TINY_TRAIN, write_fake_mnist


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """A tiny run of 2 epochs of 4 steps, with the network's raw weights before and after every step."""
    root = tmp_path_factory.mktemp("ema")
    data, out, weights = write_fake_mnist(str(root / "data")), str(root / "out"), []
    real_step = training.train_step

    def step_and_record(state, *args, **kwargs):
        if not weights:
            weights.append({k: v.detach().clone() for k, v in state.ddpm.model.state_dict().items()})
        loss = real_step(state, *args, **kwargs)
        weights.append({k: v.detach().clone() for k, v in state.ddpm.model.state_dict().items()})
        return loss

    patch = pytest.MonkeyPatch()
    patch.setattr(training, "train_step", step_and_record)
    try:
        assert train.main(TINY_TRAIN + ["--data-root", data, "--out-dir", out]) == 0
    finally:
        patch.undo()
    return {"weights": weights, "checkpoint": checkpoint.checkpoint_path(out, "8_8"), "root": root}


def expected_ema(weights: list[dict], decay: float = 0.995, gamma: float = 8.0) -> dict:
    """The EMA as the README and ``--ema-gamma`` define it, over the global steps k = 0, 1, ... of the whole run:
    it starts at the initial weights and takes ``ema <- d_k ema + (1 - d_k) w_{k+1}``, with
    ``d_k = min(decay, (1 + k) / (gamma + 2 + k))``."""
    ema = {k: v.double() for k, v in weights[0].items()}
    for k, after in enumerate(weights[1:]):
        d = min(decay, (1 + k) / (gamma + 2 + k))
        ema = {name: d * ema[name] + (1 - d) * after[name].double() for name in ema}
    return ema


def assert_equal_weights(state: dict, reference: dict, atol: float = 1e-6, rtol: float = 0.0) -> None:
    assert set(state) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(state[name].double(), value.double(), rtol=rtol, atol=atol, msg=name)


def test_the_ema_follows_its_definition_across_epochs(recorded):
    assert len(recorded["weights"]) == 1 + 2 * 4  # the initial weights, then one set per step
    ckpt = torch.load(recorded["checkpoint"], weights_only=True)
    assert_equal_weights(ckpt["model"], recorded["weights"][-1], atol=0)
    assert_equal_weights(ckpt["ema"], expected_ema(recorded["weights"]))
    assert not all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["ema"])


def test_sampling_and_the_weights_file_use_the_ema(recorded):
    reference = expected_ema(recorded["weights"])
    ddpm, _ = checkpoint.load_sampler(recorded["checkpoint"], torch.device("cpu"))
    assert_equal_weights(ddpm.model.state_dict(), reference)
    exported = str(recorded["root"] / "weights.safetensors")
    export_weights.export_weights(recorded["checkpoint"], exported)
    ddpm, _ = checkpoint.load_sampler(exported, torch.device("cpu"))
    assert_equal_weights(ddpm.model.state_dict(), reference, atol=1e-5, rtol=1e-3)  # float16: 3 digits
