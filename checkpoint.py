"""The checkpoint: one dict with model, EMA, optimizer, config, epoch and loss history.

``sample.py`` rebuilds the network from the stored ``config`` alone and loads with
``torch.load(..., weights_only=True)``, so a checkpoint never runs code when read. The config is
stored as a plain dict (:meth:`config.Config.to_dict`); version-1 checkpoints, whose config was one
flat dict, still load. A checkpoint written when a run was interrupted inside an epoch records how far
it got: ``epoch`` whole epochs and ``step`` steps of the next.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from typing import Any

import torch

from config import Config, UsageError
from ddpm import DDPM
from fileio import atomic_write
from unet import ContextUnet

FORMAT = "conditional-ddpm-mnist"
VERSION = 3  # 3: may stop inside an epoch (``step``); 2: the config is nested; 1: one flat dict
READS = (1, 2, 3)
REQUIRED_V1 = ("in_channels", "n_feat", "n_classes", "T", "beta_start", "beta_end", "p_uncond")


def run_tag(T: int, n_feat: int, dataset: str = "mnist") -> str:
    """``<T>_<n_feat>`` as in the ancestor's file names, prefixed by the dataset unless it is MNIST."""
    return f"{T}_{n_feat}" if dataset == "mnist" else f"{dataset}_{T}_{n_feat}"


def checkpoint_path(out_dir: str, T: int, n_feat: int, dataset: str = "mnist") -> str:
    """Where ``train.py`` keeps the checkpoint of one configuration."""
    return os.path.join(out_dir, "checkpoints", f"ddpm_{run_tag(T, n_feat, dataset)}.pt")


def build_ddpm(config: Config, network: torch.nn.Module | None = None) -> DDPM:
    """A DDPM with the schedule and objective of ``config`` around ``network`` (default: a fresh, untrained
    network as ``config`` describes)."""
    m, d, t = config.model, config.diffusion, config.training
    if network is None:
        network = ContextUnet(m.in_channels, m.n_feat, m.n_classes, m.image_size, bool(m.cond_encoder))
    return DDPM(network, d.T, d.beta_start, d.beta_end, t.p_uncond, d.schedule, d.prediction, t.loss_weight,
                t.snr_gamma)


def save_checkpoint(path: str, config: Config, **fields: Any) -> None:
    """Write ``{format, version, config, **fields}`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), **fields}
    atomic_write(path, lambda tmp: _save(payload, tmp))


def _save(payload: dict[str, Any], path: str) -> None:
    # through a Python file, so that a full disk is an OSError naming it, not a RuntimeError from the zip writer
    with open(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and check a checkpoint; ``ckpt["config"]`` comes back as a :class:`Config`.

    Any problem is a one-line :class:`UsageError`.
    """
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r}; train one with 'python train.py' or pass --checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(unreadable(path, err)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{path!r} is not a checkpoint written by train.py")
    if ckpt.get("version") not in READS:
        raise UsageError(f"{path!r} has checkpoint version {ckpt.get('version')}, this code reads "
                         f"{' and '.join(map(str, READS))}")
    stored = ckpt.get("config")
    if not isinstance(stored, dict) or (ckpt["version"] == 1 and any(key not in stored for key in REQUIRED_V1)):
        raise UsageError(f"{path!r} has no usable config; it was not written by this train.py")
    try:
        config = Config.from_dict(stored).validate()
    except (TypeError, UsageError) as err:
        raise UsageError(f"{path!r} has no usable config ({err})") from None
    return {**ckpt, "config": config}


def unreadable(path: str, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line.

    A file that pickles Python objects other than tensors and numbers is refused by name: torch's own
    message advises loading it with ``weights_only=False``, which would run whatever code it carries.
    """
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        found = re.search(r"GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"{path!r} is not a checkpoint this project wrote: it holds pickled Python objects{what} "
                "that could run code when loaded, so it was not loaded")
    first = text.splitlines()[0] if text else type(err).__name__
    return f"cannot read checkpoint {path!r} (corrupt or not a PyTorch file: {first[:200]})"


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
