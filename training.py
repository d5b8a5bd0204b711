"""The training loop: Algorithm 1 of Ho et al. 2020 over epochs, with an EMA of the weights.

:func:`train` runs (or continues) a run described by a :class:`config.Config` on images already in
memory and writes, after every epoch, a grid of samples, the loss plot and the checkpoint.
``train.py`` is its command line; ``experiments.py`` calls it directly.

A run ends early in three ways (``stopping``): SIGINT or SIGTERM finish the current step, save a
checkpoint that records the step reached inside the epoch, and raise :class:`stopping.Interrupted`; a
NaN or infinite loss or weight raises :class:`stopping.RunFailed` before anything of it is saved; so
does a write that fails. Each epoch's order and noise come from generators seeded by the epoch, so a
resumed run replays them from the step it stopped at and ends, on a CPU, with the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import build_ddpm, checkpoint_path, run_tag, save_checkpoint  # noqa: E402
from config import Config, TrainConfig  # noqa: E402
from data import DATASETS, batches, first_images, save_grid, to_model_range  # noqa: E402
from ddpm import DDPM, DEFAULT_SAMPLER  # noqa: E402
from distributed import SINGLE, Replicas, Shard, sum_over_ranks  # noqa: E402
from fileio import atomic_write, ensure_writable_dir, exclusive, remove_stale_temps  # noqa: E402
from generation import Sampling, generate  # noqa: E402
from optimizers import make_optimizer  # noqa: E402
from speed import PLAIN, Speed, autocast, prepare_model, prepare_process  # noqa: E402
from stopping import Interrupted, RunFailed, StopRequests  # noqa: E402


@dataclass
class TrainState:
    """What a training step changes: the DDPM's network, its EMA copy and the optimizer."""

    ddpm: DDPM
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    replicas: Replicas
    speed: Speed = PLAIN


def output_paths(out_dir: str, config: Config) -> dict[str, str]:
    """Every file a run writes, under the ancestor's names (``<T>_<n_feat>``, dataset-prefixed unless MNIST)."""
    T, n_feat = config.diffusion.T, config.model.n_feat
    tag = run_tag(T, n_feat, config.dataset)
    return {
        "grids": os.path.join(out_dir, f"DDMP_generated_samples_{tag}"),
        "grid": os.path.join(out_dir, f"DDMP_generated_samples_{tag}", "samples_epoch{epoch}_" + tag + ".png"),
        "loss_plot": os.path.join(out_dir, f"loss_plot_{tag}.png"),
        "checkpoint": checkpoint_path(out_dir, T, n_feat, config.dataset),
        "snapshot": os.path.join(out_dir, "checkpoints", "snapshots", f"ddpm_{tag}_epoch{{epoch}}.pt"),
        "lock": os.path.join(out_dir, "checkpoints", f"ddpm_{tag}.lock"),
    }


def prepare_outputs(out_dir: str, paths: dict[str, str]) -> None:
    """Create the output folders and prove they can be written, before any training."""
    for folder in (out_dir, paths["grids"], os.path.dirname(paths["checkpoint"])):
        ensure_writable_dir(folder, "output folder")


@contextlib.contextmanager
def claim_outputs(out_dir: str, paths: dict[str, str]) -> Iterator[None]:
    """Prepare the output folders and hold the run's lock for the block; first remove what a killed run left.

    A second run of the same configuration in the same folder is a one-line :class:`UsageError`.
    """
    prepare_outputs(out_dir, paths)
    with exclusive(paths["lock"], repr(paths["checkpoint"])):
        stale = remove_stale_temps([paths["checkpoint"], paths["loss_plot"], paths["grid"].format(epoch="*"),
                                    paths["snapshot"].format(epoch="*")])
        if stale:
            print(f"note: removed {len(stale)} temporary file(s) that a killed run left, e.g. {stale[0]!r}",
                  file=sys.stderr)
        yield


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model``, parameter by parameter."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def ema_decay_at(step: int, decay: float, gamma: float = 8.0) -> float:
    """The EMA decay of global step ``step`` (0-based): ``min(decay, (1 + step) / (gamma + 2 + step))``.

    Until the cap ``decay`` is reached the EMA is a power-function average (Karras et al. 2024):
    step k's weights count about ``k ** gamma`` times, so the EMA spans a fixed share of the run so far
    (``sigma_rel`` 0.09 for gamma 8, 0.05 for gamma 16) instead of remembering the random initialisation.
    """
    return min(decay, (1.0 + step) / (gamma + 2.0 + step))


def learning_rate(run: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of global step ``step`` (0-based) of a run of ``run.epochs * steps_per_epoch`` steps.

    ``epoch-linear`` (the ancestor's): ``lr * (1 - epoch / epochs)``, constant within an epoch. ``cosine``:
    a linear warm-up over ``warmup`` steps, then half a cosine from ``lr`` to 0 at the last step.
    """
    if run.lr_schedule == "epoch-linear":
        return run.lr * (1 - (step // steps_per_epoch) / run.epochs)
    total = run.epochs * steps_per_epoch
    if step < run.warmup:
        return run.lr * (step + 1) / run.warmup
    progress = (step - run.warmup) / max(1, total - run.warmup)
    return run.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def align_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded per-parameter state tensor (Adam's moments) its parameter's memory layout.

    A checkpoint saved by a channels-last run and resumed in an NCHW one (or the reverse: bf16 and fp32
    paths use different layouts) loads the moments in the old layout, and the fused Adam kernel pairs
    elements by memory position, not by index, so its updates would be silently wrong.
    """
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def use_fused_kernel(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Adam's fused kernel on or off as this run's speed says, not as the saved run's did.

    ``load_state_dict`` restores the saved groups' ``fused`` with the rest of their settings; the step counts
    go where each kernel keeps them (fused: on the parameter's device, otherwise on the CPU).
    """
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(p.device if fused else "cpu")


def train_step(state: TrainState, images: torch.Tensor, labels: torch.Tensor,
               draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ema_decay: float,
               batch: int | None = None, grad_clip: float = 0.0) -> torch.Tensor:
    """Algorithm 1 on one batch: the loss (``|eps - eps_model(x_t, t, y)|^2``, or ``DDPM.loss``'s target and
    weights), a gradient step, the EMA update.

    ``images`` are ``uint8 (B, H, W)``; ``draws`` are the batch's ``t``, ``eps`` and dropped labels
    (``DDPM.draw_training_noise``). Returns the loss without reading it back (that would wait for the
    device). With several processes, ``images`` are this rank's slice of a global batch of ``batch``.
    ``grad_clip > 0`` scales the gradient down to that global norm where it is longer.
    """
    x0 = to_model_range(images, state.speed.channels_last)
    with autocast(x0.device, state.speed):
        loss = state.replicas.module(x0, labels, draws=draws)  # DDPM.loss
    state.optimizer.zero_grad(set_to_none=True)
    state.replicas.backward(loss, len(images), batch or len(images))
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.ddpm.eps_model.parameters(), grad_clip)
    state.optimizer.step()
    update_ema(state.ema, state.ddpm.eps_model, ema_decay)
    return state.replicas.share(loss, len(images), batch or len(images))


def train_epoch(state: TrainState, images: torch.Tensor, labels: torch.Tensor, config: Config, epoch: int,
                step: int, stop: StopRequests, first: int = 0) -> list[float]:
    """One pass over ``images (N, H, W) uint8`` in a seeded random order, from batch ``first`` on; the per-step losses.

    Every rank walks the same order and draws the same noise for the whole batch, keeping its slice.
    ``step`` is the global step of the epoch's batch 0 (the EMA warms up over global steps). When ``stop``
    is asked to, the pass ends early, with fewer losses: after the current step in one process, at the
    next read-back of the losses with several (all ranks must stop after the same step).
    """
    run, device, shard = config.training, images.device, state.replicas.shard
    n = steps_per_epoch(len(images), run.batch_size)
    order_gen, noise_gen = epoch_generators(state.ddpm, config, epoch, device, first)
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet read back: reading one waits for the device
    with tqdm(total=n, initial=first, desc=f"epoch {epoch + 1}/{run.epochs}", dynamic_ncols=True,
              file=sys.stderr, disable=not shard.is_main) as bar:  # closed before an error is printed
        state.ddpm.train()
        for i, (x, y) in enumerate(batches(images, labels, run.batch_size, order_gen, state.speed.on_device_data,
                                           device, state.replicas.part, skip=first), start=first):
            batch = min(run.batch_size, len(images) - i * run.batch_size)
            draws = state.ddpm.draw_training_noise(batch, state.ddpm.image_shape, device, noise_gen)
            draws = tuple(state.replicas.part(d) for d in draws)
            set_lr(state.optimizer, learning_rate(run, epoch * n + i, n))
            decay = ema_decay_at(step + i, run.ema_decay, run.ema_gamma)
            pending.append(train_step(state, x, y, draws, decay, batch, run.grad_clip))
            if len(pending) == state.speed.log_every or i == n - 1 or (stop.signum and shard.world == 1):
                values, stopping = read_back(pending, stop, shard)
                check_losses(values, epoch, i + 1 - len(values), n, run.lr)
                losses += values
                bar.update(len(pending))
                pending.clear()
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
                if stopping:
                    break
    return losses


def epoch_generators(ddpm: DDPM, config: Config, epoch: int, device: torch.device,
                     first: int = 0) -> tuple[torch.Generator, torch.Generator]:
    """The epoch's data order and noise generators, seeded by the epoch, the noise of batches ``< first`` drawn.

    Drawing that noise again (and dropping it) puts a run resumed at batch ``first`` where an uninterrupted
    run would be, on any device.
    """
    run = config.training
    order_gen = torch.Generator().manual_seed(run.seed * 7919 + epoch)
    noise_gen = torch.Generator(device=device).manual_seed(run.seed * 7919 + epoch + 1)
    for _ in range(first):  # every batch before the last is full
        ddpm.draw_training_noise(run.batch_size, ddpm.image_shape, device, noise_gen)
    return order_gen, noise_gen


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return -(-n_images // batch_size)


def read_back(pending: list[torch.Tensor], stop: StopRequests, shard: Shard) -> tuple[list[float], bool]:
    """The pending losses as floats (summed over ranks), and whether any rank was asked to stop."""
    asked = torch.tensor([float(stop.signum is not None)], device=pending[0].device)
    values = sum_over_ranks(torch.cat([torch.stack(pending).float(), asked]), shard).tolist()
    return values[:-1], values[-1] > 0


def check_losses(values: list[float], epoch: int, done: int, n: int, lr: float) -> None:
    """A NaN or infinite loss among the losses of steps ``done + 1, ...`` ends the run before it is saved."""
    for k, value in enumerate(values):
        if not math.isfinite(value):
            raise RunFailed(diverged(f"loss {value}", epoch, done + k + 1, n, lr))


def check_weights(state: TrainState, epoch: int, step: int, n: int, lr: float) -> None:
    """Weights (or optimizer moments) that hold a NaN or an infinity end the run before they are saved."""
    moments = [t for s in state.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.is_floating_point()]
    tensors = [*state.ddpm.eps_model.parameters(), *state.ema.parameters(), *moments]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise RunFailed(diverged("NaN or infinite weights", epoch, step, n, lr))


def diverged(what: str, epoch: int, step: int, n: int, lr: float) -> str:
    return (f"training diverged: {what} at epoch {epoch + 1}, step {step} of {n}; nothing of it was saved "
            f"(the last checkpoint stays); start over (--overwrite) with a lower --lr than {lr:g}")


def grid_sampling(config: Config) -> Sampling:
    """The per-epoch grids: the default sampler with ``grid_steps`` steps (0: the full ancestral sampler).

    A grid is a progress picture, and a full ancestral run each epoch would cost more than the epoch
    itself on a CPU.
    """
    run = config.training
    if run.grid_steps == 0:
        return Sampling("ddpm", guidance=run.guidance)
    return Sampling(DEFAULT_SAMPLER, steps=run.grid_steps, guidance=run.guidance)


def sample_grid(ema: nn.Module, config: Config, path: str) -> None:
    """Draw ``grid_rows`` rows of classes 0..9 with the EMA weights, the same noise every epoch."""
    ddpm = build_ddpm(config, ema).to(next(ema.parameters()).device)
    ema.eval()
    labels = torch.arange(config.model.n_classes).repeat(config.training.grid_rows)
    x = generate(ddpm, labels, grid_sampling(config), seed=config.training.seed, batch_size=len(labels))
    header = None if config.dataset == "mnist" else list(DATASETS[config.dataset].class_names)
    save_grid(x, path, ncol=config.model.n_classes, header=header)


def loss_label(config: Config) -> str:
    """What the training loss measures: the squared error of the network's target, and its weights."""
    target = {"eps": "noise", "v": "v", "x0": "x0"}[config.diffusion.prediction]
    weights = {"uniform": "", "min-snr": ", Min-SNR weighted", "truncated-snr": ", truncated-SNR weighted"}
    return f"MSE loss ({target}{weights[config.training.loss_weight]})"


def plot_losses(losses: list[float], steps_per_epoch: int, path: str, title: str, ylabel: str) -> None:
    """Loss per step (thin) and mean loss per epoch (dots), against epochs."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = torch.arange(1, len(losses) + 1) / steps_per_epoch
    ax.plot(steps.tolist(), losses, lw=0.6, alpha=0.5, label="per step")
    per_epoch = [sum(losses[i:i + steps_per_epoch]) / len(losses[i:i + steps_per_epoch])
                 for i in range(0, len(losses), steps_per_epoch)]
    ax.plot(list(range(1, len(per_epoch) + 1)), per_epoch, "o-", label="epoch mean")
    ax.set(xlabel="epoch", ylabel=ylabel, yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def draw_progress(state: TrainState, config: Config, losses: list[float], epoch: int, paths: dict[str, str],
                  steps_per_epoch: int) -> None:
    """The sample grid of ``epoch`` and the loss plot so far."""
    sample_grid(state.ema, config, paths["grid"].format(epoch=epoch))
    title = f"DDPM T={config.diffusion.T}, n_feat={config.model.n_feat}"
    plot_losses(losses, steps_per_epoch, paths["loss_plot"],
                title + ("" if config.dataset == "mnist" else f", {config.dataset}"), loss_label(config))


def keep_snapshot(paths: dict[str, str], epoch: int) -> None:
    """A copy of the checkpoint just written, kept as ``snapshots/ddpm_<T>_<n_feat>_epoch<e>.pt``."""
    target = paths["snapshot"].format(epoch=epoch)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(paths["checkpoint"], tmp))


def build_state(config: Config, device: torch.device, speed: Speed, shard: Shard,
                ckpt: dict[str, Any] | None) -> tuple[TrainState, dict[str, Any]]:
    """A fresh (seeded) or resumed training state, and the history so far.

    The history: ``losses`` (every step), ``epoch`` (whole epochs done), ``step`` (steps done of the
    next epoch, when a run was interrupted inside it), ``train_seconds``.
    """
    torch.manual_seed(config.training.seed)
    ddpm = build_ddpm(config).to(device)
    ema = copy.deepcopy(ddpm.eps_model).requires_grad_(False)
    prepare_process(speed)
    prepare_model(ddpm.eps_model, speed)
    run = config.training
    optimizer = make_optimizer(ddpm.eps_model, run.lr, speed, run.adam_beta2, run.optimizer, run.muon_lr_mult)
    history: dict[str, Any] = {"losses": [], "epoch": 0, "step": 0, "train_seconds": 0.0}
    if ckpt is not None:
        ddpm.eps_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        align_state_layout(optimizer)
        use_fused_kernel(optimizer, speed.fused_optimizer)
        history = {key: ckpt.get(key, default) for key, default in history.items()}
    return TrainState(ddpm, ema, optimizer, Replicas(ddpm, shard, device), speed), history


@dataclass
class Job:
    """What :func:`train` keeps beside the :class:`TrainState`: the settings, the files, the progress so far."""

    config: Config
    paths: dict[str, str]
    history: dict[str, Any]
    steps: int  # per epoch
    snapshot_epochs: Sequence[int] = ()


def train(config: Config, images: torch.Tensor, labels: torch.Tensor, paths: dict[str, str],
          speed: Speed = PLAIN, shard: Shard = SINGLE, ckpt: dict[str, Any] | None = None,
          snapshot_epochs: Sequence[int] = ()) -> dict[str, Any]:
    """Run (or, from ``ckpt``, continue) training to ``config.training.epochs`` on ``images`` where they lie
    (the first ``config.training.train_images`` of them, if that is set).

    Rank 0 writes every per-epoch file. Returns the history (:func:`build_state`). SIGINT or SIGTERM end
    it after the current step with a checkpoint and :class:`stopping.Interrupted`.
    """
    images, labels = first_images(images, labels, config.training.train_images)
    state, history = build_state(config, images.device, speed, shard, ckpt)
    job = Job(config, paths, history, steps_per_epoch(len(images), config.training.batch_size), snapshot_epochs)
    log = functools.partial(print, file=sys.stderr) if shard.is_main else lambda *a, **k: None
    log(describe_run(config, len(images), images.device, speed, shard, history, job.steps))
    with StopRequests() as stop:
        for epoch in range(history["epoch"], config.training.epochs):
            started, first = time.perf_counter(), history["step"]
            done = train_epoch(state, images, labels, config, epoch, len(history["losses"]) - first, stop, first)
            history["losses"] += done
            history["step"] = first + len(done)
            if history["step"] < job.steps:  # asked to stop inside the epoch: keep what it did
                history["train_seconds"] += time.perf_counter() - started
                check_weights(state, epoch, history["step"], job.steps, config.training.lr)
                write_checkpoint(state, job)
                raise Interrupted(interrupted(epoch, history["step"], job.steps), stop.signum or signal.SIGTERM)
            end_epoch(state, job, epoch, started)
            mean = sum(history["losses"][-job.steps:]) / job.steps
            log(f"epoch {epoch + 1}/{config.training.epochs}: loss {mean:.4f}, "
                f"{time.perf_counter() - started:.1f}s, total {history['train_seconds']:.1f}s")
            if epoch + 1 < config.training.epochs and asked_to_stop(stop, shard, images.device):
                raise Interrupted(interrupted(epoch, job.steps, job.steps), stop.signum or signal.SIGTERM)
    log(f"done: {paths['checkpoint']}")
    return history


def end_epoch(state: TrainState, job: Job, epoch: int, started: float) -> None:
    """After epoch ``epoch`` (from 0): check the weights, draw the grid and the loss plot, save the checkpoint."""
    check_weights(state, epoch, job.steps, job.steps, job.config.training.lr)
    if state.replicas.shard.is_main:
        draw_progress(state, job.config, job.history["losses"], epoch + 1, job.paths, job.steps)
    job.history["epoch"], job.history["step"] = epoch + 1, 0
    job.history["train_seconds"] += time.perf_counter() - started
    write_checkpoint(state, job)
    if state.replicas.shard.is_main and epoch + 1 in job.snapshot_epochs:
        keep_snapshot(job.paths, epoch + 1)


def write_checkpoint(state: TrainState, job: Job) -> None:
    """The checkpoint of the state after ``history["epoch"]`` epochs and ``history["step"]`` steps (rank 0)."""
    if state.replicas.shard.is_main:
        save_checkpoint(job.paths["checkpoint"], job.config, model=state.ddpm.eps_model.state_dict(),
                        ema=state.ema.state_dict(), optimizer=state.optimizer.state_dict(), **job.history)


def asked_to_stop(stop: StopRequests, shard: Shard, device: torch.device) -> bool:
    """Whether any rank was asked to stop (ranks must agree, or the others would wait for it forever)."""
    asked = torch.tensor([float(stop.signum is not None)], device=device)
    return bool(sum_over_ranks(asked, shard).item() > 0)


def interrupted(epoch: int, step: int, n: int) -> str:
    return f"interrupted at epoch {epoch + 1}, step {step} of {n}; checkpoint saved; continue with --resume"


def describe_run(config: Config, n_images: int, device: torch.device, speed: Speed, shard: Shard,
                 history: dict[str, Any], steps: int) -> str:
    run = config.training
    per_rank = f" = {shard.world} processes x ~{run.batch_size // shard.world}" if shard.world > 1 else ""
    first = history["epoch"] + 1
    within = f" (epoch {first} from step {history['step'] + 1} of {steps})" if history["step"] else ""
    return (f"training on {n_images} images, {device}, T={config.diffusion.T} n_feat={config.model.n_feat} "
            f"batch {run.batch_size}{per_rank}, epochs {first}..{run.epochs}{within}; {speed}")
