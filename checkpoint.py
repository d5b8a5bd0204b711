"""The checkpoint: one dict with model, EMA, optimizer, config, epoch and loss history.

``sample.py`` rebuilds the network from the stored ``config`` alone and loads with
``torch.load(..., weights_only=True)``, so a checkpoint never runs code when read.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch

from cli import UsageError, atomic_write
from ddpm import DDPM
from unet import ContextUnet

FORMAT = "conditional-ddpm-mnist"
VERSION = 1
REQUIRED_CONFIG = ("in_channels", "n_feat", "n_classes", "T", "beta_start", "beta_end", "p_uncond")


def run_tag(T: int, n_feat: int, dataset: str = "mnist") -> str:
    """``<T>_<n_feat>`` as in the ancestor's file names, prefixed by the dataset unless it is MNIST."""
    return f"{T}_{n_feat}" if dataset == "mnist" else f"{dataset}_{T}_{n_feat}"


def checkpoint_path(out_dir: str, T: int, n_feat: int, dataset: str = "mnist") -> str:
    """Where ``train.py`` keeps the checkpoint of one configuration."""
    return os.path.join(out_dir, "checkpoints", f"ddpm_{run_tag(T, n_feat, dataset)}.pt")


def build_ddpm(config: dict[str, Any]) -> DDPM:
    """A fresh (untrained) DDPM with the network and schedule described by ``config``."""
    model = ContextUnet(config["in_channels"], config["n_feat"], config["n_classes"])
    return DDPM(model, config["T"], config["beta_start"], config["beta_end"], config["p_uncond"])


def save_checkpoint(path: str, **fields: Any) -> None:
    """Write ``{format, version, **fields}`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **fields}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and check a checkpoint; any problem is a one-line :class:`UsageError`."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r}; train one with 'python train.py' or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read checkpoint {path!r} (corrupt or not a PyTorch file: {first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path!r} is not a checkpoint written by train.py")
    if ckpt.get("version") != VERSION:
        raise UsageError(f"{path!r} has checkpoint version {ckpt.get('version')}, this code reads {VERSION}")
    config = ckpt.get("config")
    if not isinstance(config, dict) or any(key not in config for key in REQUIRED_CONFIG):
        raise UsageError(f"{path!r} has no usable config; it was not written by this train.py")
    return ckpt


def load_sampler(path: str, device: torch.device, weights: str = "ema") -> tuple[DDPM, dict[str, Any]]:
    """Rebuild the DDPM from a checkpoint's config and load its EMA (or ``"model"``) weights."""
    ckpt = load_checkpoint(path)
    ddpm = build_ddpm(ckpt["config"])
    try:
        ddpm.eps_model.load_state_dict(ckpt[weights])
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"{path!r}: weights do not match its config ({str(err).splitlines()[0][:200]})") from None
    return ddpm.to(device).eval(), ckpt


def newest_checkpoint(directory: str) -> str:
    """The most recently written ``*.pt`` in ``directory``."""
    found = glob.glob(os.path.join(directory, "*.pt"))
    if not found:
        raise UsageError(
            f"no checkpoint in {directory!r}; train one with 'python train.py' or pass --checkpoint PATH"
        )
    return max(found, key=os.path.getmtime)
