"""The checkpoint, one dict (model, EMA, optimizer, config, epoch, losses) read with ``weights_only=True``, and the
weights file, a safetensors file of the EMA weights in float16 with the config in its metadata and a SHA-256
(``lib.weights_io``), for sampling only. Every file is checked before a network is built from it: its config
against ``Config.validate``'s bounds (a small file cannot ask for gigabytes), its weights for NaN, and settings
this version no longer has. Any problem is a one-line :class:`UsageError`.
"""

import glob
import io
import json
import os
import pickle
import re
from typing import Any

import torch

from ddpm import DDPM
from lib import weights_io
from lib.config import Config, removed_settings
from lib.errors import UsageError
from lib.fileio import atomic_write, write_bytes
from unet import ContextUnet

FORMAT = "conditional-ddpm-mnist"
VERSION = 3  # 3: may stop inside an epoch (``step``); 2: the config is nested; 1: one flat dict
READS = (1, 2, 3)
KINDS = ("training", "weights")  # a checkpoint without "kind" is a training checkpoint
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder
BUNDLED = "pretrained/mnist.safetensors"  # relative to the project's folder
BUNDLED_NAME = "pretrained"  # --checkpoint pretrained: the bundled model
DEFAULT_DIR = "checkpoints"  # where train.py writes, and where sample.py and evaluate.py look first
TRAIN_COMMAND = "python train.py --preset cpu --data-root DATA"
TRAIN_YOUR_OWN = f"train your own with '{TRAIN_COMMAND}'"
REQUIRED_V1 = ("in_channels", "n_feat", "n_classes", "T", "beta_start", "beta_end", "p_uncond")


def run_name(config: Config) -> str:
    """A run's default name: ``<T>_<n_feat>``, as in the original file names, prefixed by the data set unless MNIST."""
    tag = f"{config.diffusion.T}_{config.model.n_feat}"
    return tag if config.dataset == "mnist" else f"{config.dataset}_{tag}"


def checkpoint_path(out_dir: str, name: str) -> str:
    """Where ``train.py`` keeps the checkpoint of the run ``name``."""
    return os.path.join(out_dir, "checkpoints", f"ddpm_{name}.pt")


def build_ddpm(config: Config, network: torch.nn.Module | None = None) -> DDPM:
    """A DDPM as ``config`` describes around ``network`` (default: a fresh network as ``config`` describes)."""
    m, d = config.model, config.diffusion
    if network is None:
        network = ContextUnet(m.in_channels, m.n_feat, m.n_classes, m.image_size, bool(m.cond_encoder))
    return DDPM(network, d.T, d.beta_start, d.beta_end, d.prediction, config.training.p_uncond)


def save_checkpoint(path: str, config: Config, **fields: Any) -> None:
    """Write ``{format, version, config, **fields}`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), **fields}
    atomic_write(path, lambda tmp: _save(payload, tmp))


def _save(payload: dict[str, Any], path: str) -> None:
    # serialised in memory, then written by Python: a full disk is then an OSError naming the file, where
    # torch's zip writer would fail with a RuntimeError of its own
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str, training: bool = False) -> dict[str, Any]:
    """Read and check a checkpoint or weights file (``ckpt["config"]`` a :class:`Config`); refuse a setting this
    version no longer has if it changes how the network samples, or any when ``training`` (to resume)."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r}; train one with '{TRAIN_COMMAND}' or pass --checkpoint PATH")
    with open(path, "rb") as f:
        blob = f.read()
    if weights_io.looks_like_safetensors(blob):
        return _load_weights_file(path, blob, training)
    try:
        ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
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
    config = checked_config(path, stored, training)
    if ckpt.get("kind", "training") not in KINDS:
        raise UsageError(f"{path!r} is a checkpoint of unknown kind {ckpt.get('kind')!r}")
    if ckpt.get("kind") == "weights":
        ckpt = {**ckpt, "ema": _cast_floats(ckpt.get("ema"), torch.float32, path)}
    for part in ("model", "ema"):
        check_finite(path, ckpt.get(part))
    return {**ckpt, "config": config}


def checked_config(path: str, stored: Any, training: bool = False) -> Config:
    """The :class:`Config` a file stores, within the bounds of :meth:`Config.validate`, before anything is built."""
    removed = removed_settings(stored, sampling=not training) if isinstance(stored, dict) else []
    if removed:
        raise UsageError(f"{path!r} was trained with {removed[0]}, a setting this version no longer has "
                         "(docs/results.md#what-was-tried); use the version it was trained with")
    try:
        return Config.from_dict(stored).validate()
    except (TypeError, AttributeError, UsageError) as err:
        raise UsageError(f"{path!r} has no usable config ({err})") from None


def check_finite(path: str, state: Any) -> None:
    """A one-line :class:`UsageError` if a state dict holds NaN or infinite weights."""
    if isinstance(state, dict) and not all(torch.isfinite(v).all() for v in state.values()
                                           if isinstance(v, torch.Tensor) and v.is_floating_point()):
        raise UsageError(f"{path!r} holds NaN or infinite weights: it is damaged or was saved from a diverged "
                         "run; use another checkpoint")


def _load_weights_file(path: str, blob: bytes, training: bool = False) -> dict[str, Any]:
    """A safetensors weights file (:func:`export_weights`), checked whole before its tensors are made."""
    try:
        meta = weights_io.read_header(blob)
        if meta.get("format") != FORMAT or meta.get("kind") != "weights":
            raise weights_io.DamagedFile("it is not a weights file of this project (see sample.py --export-weights)")
        config = checked_config(path, json.loads(meta.get("config", "null")), training)
        ema = weights_io.read_tensors(blob)
        numbers = {key: json.loads(meta[key]) for key in ("epoch", "steps", "final_loss", "train_seconds")
                   if key in meta}
    except (weights_io.DamagedFile, json.JSONDecodeError) as err:
        raise UsageError(f"cannot use {path!r}: {err}") from None
    ema = _cast_floats(ema, torch.float32, path)
    check_finite(path, ema)
    return {"format": FORMAT, "version": VERSION, "kind": "weights", "config": config, "ema": ema,
            "about": meta.get("about", ""), "epoch": 0, **numbers}


def _cast_floats(state: Any, dtype: torch.dtype, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path!r} holds no usable EMA weights")
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_training_checkpoint(path: str) -> dict[str, Any]:
    """:func:`load_checkpoint` for resuming training: a weights file (no optimizer) is refused."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r} to resume; check --out-dir and --name (or the flags that name "
                         "the run: --T, --n-feat, --dataset), or leave out --resume to start a new run")
    ckpt = load_checkpoint(path, training=True)
    if ckpt.get("kind") == "weights":
        raise UsageError(f"{path!r} is a weights file (EMA weights only, for sampling); training cannot resume "
                         "from it: resume from the checkpoint train.py wrote, or start over with --overwrite")
    return ckpt


def unreadable(path: str, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line; a pickle of Python objects other than
    tensors is named, not loaded (torch's message advises ``weights_only=False``, which would run its code)."""
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
    if weights != "ema" and ckpt.get("kind") == "weights":
        raise UsageError(f"{path!r} is a weights file: it holds only the EMA weights, not {weights!r}")
    ddpm = build_ddpm(ckpt["config"])
    try:
        ddpm.model.load_state_dict(ckpt[weights])
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"{path!r}: weights do not match its config ({str(err).splitlines()[0][:200]})") from None
    return ddpm.to(device).eval(), ckpt


def checkpoints_in(directory: str) -> list[str]:
    """The ``*.pt`` files directly in ``directory`` (not in subfolders such as ``classifier/`` or ``snapshots/``)."""
    return [path for path in glob.glob(os.path.join(directory, "*.pt")) if os.path.isfile(path)]


def newest_checkpoint(directory: str) -> str:
    """The most recently written ``*.pt`` directly in ``directory``."""
    found = checkpoints_in(directory)
    if not found:
        raise UsageError(
            f"no checkpoint in {directory!r}; train one with '{TRAIN_COMMAND}' or pass --checkpoint PATH"
        )
    return max(found, key=os.path.getmtime)


def bundled_path() -> str:
    """The bundled model's file, wherever the command is run from."""
    return os.path.join(HERE, *BUNDLED.split("/"))


def find_checkpoint(name: str | None, fallback: bool = True) -> tuple[str, bool]:
    """The file ``--checkpoint name`` stands for, and whether it is the bundled model: ``None`` is the newest
    checkpoint in ``checkpoints/``, else (with ``fallback``) the bundled model; ``"pretrained"`` the bundled model;
    a folder its newest ``*.pt``."""
    if name == BUNDLED_NAME:
        path = bundled_path()
        if not os.path.isfile(path):
            raise UsageError(f"the bundled model {path!r} is missing from this copy of the project; {TRAIN_YOUR_OWN}")
        return path, True
    if name is None:
        if fallback and not checkpoints_in(DEFAULT_DIR) and os.path.isfile(bundled_path()):
            return bundled_path(), True
        name = DEFAULT_DIR
    return (newest_checkpoint(name) if os.path.isdir(name) else name), False


SHORT_RUN = 1000  # optimizer steps below which a model's digits are rough; --preset cpu trains 1,256


def model_note(path: str, ckpt: dict[str, Any], bundled: bool) -> str | None:
    """The line about the model a script picked: the bundled one, or one from an unfinished or very short run."""
    if bundled:
        return f"using the bundled model {path} ({ckpt.get('about') or 'no description'}); {TRAIN_YOUR_OWN}"
    config, done = ckpt["config"], ckpt.get("epoch", 0)
    steps = len(ckpt.get("losses") or []) or ckpt.get("steps", 0)
    if done < config.training.epochs or ckpt.get("step"):
        return (f"note: {path} is from an unfinished run ({done} of {config.training.epochs} epochs done); expect "
                f"rough digits, or noise; finish it with its train.py command and --resume (e.g. 'python train.py "
                f"--preset {config.preset} --data-root DATA --resume')")
    if steps and steps < SHORT_RUN:
        return (f"note: {path} was trained for only {steps:,} steps; expect rough digits, or noise "
                f"(--preset cpu trains 1,256: '{TRAIN_COMMAND}')")
    return None

