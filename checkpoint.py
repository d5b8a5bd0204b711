"""The checkpoint: one dict with model, EMA, optimizer, config, epoch and loss history; and the weights file.

``sample.py`` rebuilds the network from the stored ``config`` alone and loads with
``torch.load(..., weights_only=True)``, so a checkpoint never runs code when read. The config is
stored as a plain dict (:meth:`config.Config.to_dict`); version-1 checkpoints, whose config was one
flat dict, still load. A checkpoint written when a run was interrupted inside an epoch records how far
it got: ``epoch`` whole epochs and ``step`` steps of the next.

A *weights file* (:func:`export_weights`, ``kind: "weights"``) is the compact form of a checkpoint for
sampling only: a safetensors file of the EMA weights in float16, with the config (as JSON) and how it was
trained in its metadata and a SHA-256 of its contents (``weights_io``); no optimizer, no network weights,
no loss history. :func:`load_checkpoint` returns its weights in float32, so sampling runs in float32;
training cannot resume from it. Weights files of earlier versions, torch files, still load. The project
bundles one (:data:`BUNDLED`), used when no checkpoint was trained.

Every file is checked before a network is built from it: its config against the bounds of
``config.Config.validate`` (so a small file cannot ask for gigabytes) and its weights for NaN and
infinities. Any problem is a one-line :class:`UsageError`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import re
from typing import Any

import torch

from config import Config, UsageError
from ddpm import DDPM
import weights_io
from fileio import atomic_write, ensure_writable_dir, write_bytes
from unet import ContextUnet

FORMAT = "conditional-ddpm-mnist"
VERSION = 3  # 3: may stop inside an epoch (``step``); 2: the config is nested; 1: one flat dict
READS = (1, 2, 3)
KINDS = ("training", "weights")  # a checkpoint without "kind" is a training checkpoint
HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = {"mnist": "pretrained/mnist.safetensors"}  # relative to the project's folder
BUNDLED_NAME = "pretrained"  # --checkpoint pretrained: the bundled model
DEFAULT_DIR = "checkpoints"  # where train.py writes, and where sample.py and evaluate.py look first
TRAIN_COMMAND = "python train.py --preset cpu --data-root DATA"
TRAIN_YOUR_OWN = f"train your own with '{TRAIN_COMMAND}'"
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
        network = ContextUnet(m.in_channels, m.n_feat, m.n_classes, m.image_size, bool(m.cond_encoder),
                              bool(m.ada_norm), m.mid_blocks, bool(m.self_cond))
    return DDPM(network, d.T, d.beta_start, d.beta_end, t.p_uncond, d.schedule, d.prediction, t.loss_weight,
                t.snr_gamma, t.t_sampling, t.log_sigma_mean, t.log_sigma_std, t.snr_floor, t.noise_pairing,
                t.noise_candidates)


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


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and check a checkpoint or weights file; ``ckpt["config"]`` comes back as a :class:`Config`.

    Any problem is a one-line :class:`UsageError`.
    """
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r}; train one with '{TRAIN_COMMAND}' or pass --checkpoint PATH")
    with open(path, "rb") as f:
        blob = f.read()
    if weights_io.looks_like_safetensors(blob):
        return _load_weights_file(path, blob)
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
    config = checked_config(path, stored)
    if ckpt.get("kind", "training") not in KINDS:
        raise UsageError(f"{path!r} is a checkpoint of unknown kind {ckpt.get('kind')!r}")
    if ckpt.get("kind") == "weights":
        ckpt = {**ckpt, "ema": _cast_floats(ckpt.get("ema"), torch.float32, path)}
    for part in ("model", "ema"):
        check_finite(path, ckpt.get(part))
    return {**ckpt, "config": config}


def checked_config(path: str, stored: Any) -> Config:
    """The :class:`Config` a file stores, within the bounds of :meth:`Config.validate`, before anything is built."""
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


def _load_weights_file(path: str, blob: bytes) -> dict[str, Any]:
    """A safetensors weights file (:func:`export_weights`), checked whole before its tensors are made."""
    try:
        meta = weights_io.read_header(blob)
        if meta.get("format") != FORMAT or meta.get("kind") != "weights":
            raise weights_io.DamagedFile("it is not a weights file of this project (see sample.py --export-weights)")
        config = checked_config(path, json.loads(meta.get("config", "null")))
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
    """``state`` (a state dict) with its floating-point tensors cast to ``dtype``; integers stay."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path!r} holds no usable EMA weights")
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_training_checkpoint(path: str) -> dict[str, Any]:
    """:func:`load_checkpoint` for resuming training: a weights file (no optimizer) is refused."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path!r} to resume; check --out-dir and the flags that name the run "
                         "(--preset, --T, --n-feat, --dataset), or leave out --resume to start a new run")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == "weights":
        raise UsageError(f"{path!r} is a weights file (EMA weights only, for sampling); training cannot resume "
                         "from it: resume from the checkpoint train.py wrote, or start over with --overwrite")
    return ckpt


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
    if weights != "ema" and ckpt.get("kind") == "weights":
        raise UsageError(f"{path!r} is a weights file: it holds only the EMA weights, not {weights!r}")
    ddpm = build_ddpm(ckpt["config"])
    try:
        ddpm.eps_model.load_state_dict(ckpt[weights])
    except (KeyError, RuntimeError) as err:
        raise UsageError(f"{path!r}: weights do not match its config ({str(err).splitlines()[0][:200]})") from None
    return ddpm.to(device).eval(), ckpt


def load_weak_model(name: str, ddpm: DDPM) -> DDPM:
    """The model that autoguidance steers ``ddpm`` away from (``DDPM.guided_eps``), on ``ddpm``'s device.

    ``name`` is a checkpoint or weights file, a folder (its newest ``*.pt``) or ``"pretrained"``; it must
    share ``ddpm``'s images, classes and noise schedule (:meth:`DDPM.check_weak`).
    """
    try:
        path, _ = find_checkpoint(name, fallback=False)
        if not os.path.isfile(path):
            raise UsageError(f"no checkpoint at {path!r}; train.py --snapshot-epochs E keeps earlier epochs of a run")
        weak, _ = load_sampler(path, ddpm.betas.device)
        ddpm.check_weak(weak)
    except (UsageError, ValueError) as err:
        raise UsageError(f"--weak-model {name}: {err}") from None
    return weak


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


def bundled_path(dataset: str = "mnist") -> str:
    """The bundled weights file of ``dataset``, wherever the command is run from."""
    return os.path.join(HERE, *BUNDLED[dataset].split("/"))


def find_checkpoint(name: str | None, fallback: bool = True) -> tuple[str, bool]:
    """The file ``--checkpoint name`` stands for, and whether it is the bundled model.

    ``None`` (the flag left out) is the newest checkpoint in ``checkpoints/``; when there is none there and
    ``fallback`` is true, the bundled model, if this copy of the project has it. ``"pretrained"`` is the
    bundled model; a folder is its newest ``*.pt``; anything else is a file.
    """
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
    """The line to print about the model a script picked: the bundled one, or one from an unfinished or very
    short run (whose digits may be noise); ``None`` for any other."""
    if bundled:
        return bundled_note(path, ckpt)
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


def bundled_note(path: str, ckpt: dict[str, Any]) -> str:
    """The one line saying that the bundled model is used, how it was trained, and how to train one's own."""
    return f"using the bundled model {path} ({ckpt.get('about') or 'no description'}); {TRAIN_YOUR_OWN}"


def describe_training(ckpt: dict[str, Any], source: str) -> str:
    """A one-line account of how a checkpoint was trained, from what it stores."""
    config, epoch = ckpt["config"], ckpt.get("epoch", 0)
    m, d, t = config.model, config.diffusion, config.training
    text = (f"{config.dataset}, T={d.T}, n_feat={m.n_feat}, preset {config.preset}, {epoch} epoch"
            f"{'' if epoch == 1 else 's'} of batch {t.batch_size}")
    if ckpt.get("train_seconds"):
        text += f", {ckpt['train_seconds'] / 60:.0f} min of training"
    return f"{text}; exported from {os.path.basename(source)}"


def loss_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``steps`` trained and ``final_loss`` (the mean loss of the last epoch) of a training checkpoint."""
    losses = ckpt.get("losses")
    if not losses:
        return {key: ckpt[key] for key in ("steps", "final_loss", "train_seconds") if key in ckpt}
    epoch, step = ckpt.get("epoch", 0), ckpt.get("step", 0)
    per_epoch = max(1, (len(losses) - step) // epoch) if epoch else len(losses)
    last = losses[-per_epoch:]
    return {"steps": len(losses), "final_loss": float(sum(last) / len(last)),
            "train_seconds": float(ckpt.get("train_seconds", 0.0))}


def export_weights(src: str, dst: str, about: str | None = None) -> dict[str, Any]:
    """Write the weights file of checkpoint ``src`` to ``dst``, which must not exist yet; returns what it holds.

    A safetensors file (``weights_io``): the EMA weights in float16; in its metadata ``format``, ``version``,
    ``kind: "weights"``, ``config`` (JSON), ``epoch``, ``about``, ``steps``, ``final_loss`` and
    ``train_seconds``, and the SHA-256 of it all. ``about`` is one line on how the model was trained
    (default: what the checkpoint records).
    """
    if os.path.exists(dst):
        raise UsageError(f"{dst!r} already exists; remove it or choose another file (nothing is overwritten)")
    ckpt = load_checkpoint(src)
    ema = _cast_floats(ckpt.get("ema"), torch.float16, src)
    if not all(torch.isfinite(v).all() for v in ema.values() if v.is_floating_point()):
        raise UsageError(f"{src!r}: its EMA weights do not fit in float16 (not finite after the cast)")
    about = " ".join((about or ckpt.get("about") or describe_training(ckpt, src)).split())
    saved = {"epoch": ckpt.get("epoch", 0), **loss_summary(ckpt)}
    metadata = {"format": FORMAT, "version": str(VERSION), "kind": "weights",
                "config": json.dumps(ckpt["config"].to_dict()), "about": about,
                **{key: json.dumps(value) for key, value in saved.items()}}
    ensure_writable_dir(os.path.dirname(os.path.abspath(dst)), "output folder")
    weights_io.write(dst, ema, metadata)
    return {"kind": "weights", "config": ckpt["config"], "ema": ema, "about": about, **saved}
