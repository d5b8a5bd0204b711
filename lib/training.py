"""The training loop: Algorithm 1 over epochs with an EMA of the weights; after every epoch a grid, the loss plot
and the checkpoint. A signal saves a checkpoint of the step reached (``Interrupted``); a NaN or a failed write
saves nothing of it (``RunFailed``). Order and noise are seeded per epoch, so a resumed run ends as one that
nothing interrupted.
"""

import contextlib
import copy
import functools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Callable, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ddpm import DDPM  # noqa: E402
from lib.checkpoint import build_ddpm, checkpoint_path, save_checkpoint  # noqa: E402
from lib.config import Config  # noqa: E402
from lib.data import DATASETS, batches, save_grid, to_model_range  # noqa: E402
from lib.distributed import SINGLE, Replicas, Shard, sum_over_ranks  # noqa: E402
from lib.errors import Interrupted, RunFailed  # noqa: E402
from lib.fileio import atomic_write, ensure_writable_dir, exclusive, remove_stale_temps  # noqa: E402
from lib.optimizers import make_optimizer  # noqa: E402
from lib.samplers import Sampling, generate  # noqa: E402
from lib.speed import PLAIN, Speed, autocast, prepare_model, prepare_process  # noqa: E402

# The EMA of the weights that sampling uses: decay 0.995 once warmed up; until then step k's decay is
# (1 + k) / (EMA_GAMMA + 2 + k), a power-function average (Karras et al. 2024) that forgets the random start.
EMA_DECAY, EMA_GAMMA = 0.995, 8.0


class StopRequests:
    """While active, SIGINT and SIGTERM only record that a stop was asked for (``signum``), which the training loop
    reads between steps; a second Ctrl-C while the checkpoint is written cannot cut it short. Main thread only."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum


@dataclass
class TrainState:
    """What a training step changes: the DDPM's network, its EMA copy and the optimizer."""

    ddpm: DDPM
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    replicas: Replicas
    speed: Speed = PLAIN


def output_paths(out_dir: str, name: str) -> dict[str, str]:
    """Every file the run ``name`` writes, under the original file names when ``name`` is ``<T>_<n_feat>``."""
    grids = os.path.join(out_dir, f"DDMP_generated_samples_{name}")
    return {
        "grids": grids,
        "grid": os.path.join(grids, "samples_epoch{epoch}_" + name + ".png"),
        "loss_plot": os.path.join(out_dir, f"loss_plot_{name}.png"),
        "checkpoint": checkpoint_path(out_dir, name),
        "lock": os.path.join(out_dir, "checkpoints", f"ddpm_{name}.lock"),
    }


def prepare_outputs(out_dir: str, paths: dict[str, str]) -> None:
    """Create the output folders and prove they can be written, before any training."""
    for folder in (out_dir, paths["grids"], os.path.dirname(paths["checkpoint"])):
        ensure_writable_dir(folder, "output folder")


@contextlib.contextmanager
def claim_outputs(out_dir: str, paths: dict[str, str]) -> Iterator[None]:
    """Make the output folders and hold the run's lock (a second run is a ``UsageError``) for the block, first
    removing the temp files a killed run left."""
    prepare_outputs(out_dir, paths)
    with exclusive(paths["lock"], repr(paths["checkpoint"])):
        stale = remove_stale_temps([paths["checkpoint"], paths["loss_plot"], paths["grid"].format(epoch="*")])
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


def ema_decay_at(step: int, decay: float = EMA_DECAY, gamma: float = EMA_GAMMA) -> float:
    """The EMA decay of global step ``step``: ``min(decay, (1 + step) / (gamma + 2 + step))``, so that during
    the warm-up step k counts about ``k ** gamma`` (a power-function average, Karras et al. 2024)."""
    return min(decay, (1.0 + step) / (gamma + 2.0 + step))


def learning_rate(lr: float, epochs: int, epoch: int) -> float:
    """The original linear decay: ``lr * (1 - epoch / epochs)``, constant within an epoch (``epoch`` from 0)."""
    return lr * (1 - epoch / epochs)


def align_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded state tensors (Adam's moments) their parameter's memory layout: the fused kernel pairs by
    memory position."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def use_fused_kernel(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Adam's fused kernel as this run's speed says, not as the loaded state says."""
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(p.device if fused else "cpu")


def train_step(state: TrainState, images: torch.Tensor, labels: torch.Tensor,
               draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ema_decay: float,
               batch: int | None = None) -> torch.Tensor:
    """Algorithm 1 on ``uint8 (B, H, W)`` images and their ``draws`` (``DDPM.draw_training_noise``): the loss, a
    step, the EMA update. The loss is not read back (that would wait for the device). With several processes
    ``images`` are this rank's slice of a global batch of ``batch``."""
    x0 = to_model_range(images, state.speed.channels_last)
    with autocast(x0.device, state.speed):
        loss = state.replicas.module(x0, labels, draws=draws)  # DDPM.loss
    state.optimizer.zero_grad(set_to_none=True)
    state.replicas.backward(loss, len(images), batch or len(images))
    state.optimizer.step()
    update_ema(state.ema, state.ddpm.model, ema_decay)
    return state.replicas.share(loss, len(images), batch or len(images))


def train_epoch(state: TrainState, images: torch.Tensor, labels: torch.Tensor, config: Config, epoch: int,
                step: int, stop: StopRequests, first: int = 0) -> list[float]:
    """One pass over ``images (N, H, W)`` in a seeded order from batch ``first`` on; the per-step losses. Asked to
    stop, it ends after the current step (with several processes, at the next read-back)."""
    run, device, shard = config.training, images.device, state.replicas.shard
    n = steps_per_epoch(len(images), run.batch_size)
    order_gen, noise_gen = epoch_generators(state.ddpm, config, epoch, device, first)
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet read back: reading one waits for the device
    with tqdm(total=n, initial=first, desc=f"epoch {epoch + 1}/{run.epochs}", dynamic_ncols=True,
              file=sys.stderr, disable=not shard.is_main) as bar:  # closed before an error is printed
        state.ddpm.train()
        for i, (x, y) in enumerate(batches(images, labels, run.batch_size, order_gen, state.replicas.part, first),
                                   start=first):
            batch = min(run.batch_size, len(images) - i * run.batch_size)
            draws = state.ddpm.draw_training_noise(batch, state.ddpm.image_shape, device, noise_gen)
            draws = tuple(state.replicas.part(d) for d in draws)
            for group in state.optimizer.param_groups:
                group["lr"] = learning_rate(run.lr, run.epochs, epoch)
            pending.append(train_step(state, x, y, draws, ema_decay_at(step + i), batch))
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
    """The epoch's seeded order and noise, the noise of the batches before ``first`` drawn again, as a run that
    nothing interrupted draws it."""
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
    tensors = [*state.ddpm.model.parameters(), *state.ema.parameters(), *moments]
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise RunFailed(diverged("NaN or infinite weights", epoch, step, n, lr))


def diverged(what: str, epoch: int, step: int, n: int, lr: float) -> str:
    return (f"training diverged: {what} at epoch {epoch + 1}, step {step} of {n}; nothing of it was saved "
            f"(the last checkpoint stays); start over (--overwrite) with a lower --lr than {lr:g}")


def sample_grid(ema: nn.Module, config: Config, path: str) -> None:
    """``grid_rows`` rows of classes 0..9 from the EMA weights with the default sampler, the same noise each epoch."""
    ddpm = build_ddpm(config, ema).to(next(ema.parameters()).device)
    ema.eval()
    labels = torch.arange(config.model.n_classes).repeat(config.training.grid_rows)
    x = generate(ddpm, labels, Sampling(), seed=config.training.seed, batch_size=len(labels))
    header = None if config.dataset == "mnist" else list(DATASETS[config.dataset].class_names)
    save_grid(x, path, ncol=config.model.n_classes, header=header)


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
    target = "noise" if config.diffusion.prediction == "eps" else "v"
    plot_losses(losses, steps_per_epoch, paths["loss_plot"],
                title + ("" if config.dataset == "mnist" else f", {config.dataset}"), f"MSE loss ({target})")


def build_state(config: Config, device: torch.device, speed: Speed, shard: Shard,
                ckpt: dict[str, Any] | None) -> tuple[TrainState, dict[str, Any]]:
    """A fresh (seeded) or resumed state, and the history: ``losses``, ``epoch`` (done), ``step`` (of the next,
    after an interrupt) and ``train_seconds``."""
    torch.manual_seed(config.training.seed)
    ddpm = build_ddpm(config).to(device)
    ema = copy.deepcopy(ddpm.model).requires_grad_(False)
    prepare_process(speed)
    prepare_model(ddpm.model, speed)
    run = config.training
    optimizer = make_optimizer(ddpm.model, run.lr, speed, run.optimizer)
    history: dict[str, Any] = {"losses": [], "epoch": 0, "step": 0, "train_seconds": 0.0}
    if ckpt is not None:
        ddpm.model.load_state_dict(ckpt["model"])
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


def train(config: Config, images: torch.Tensor, labels: torch.Tensor, paths: dict[str, str],
          speed: Speed = PLAIN, shard: Shard = SINGLE, ckpt: dict[str, Any] | None = None,
          after_epoch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train (or go on from ``ckpt``) to ``config.training.epochs`` on ``images`` where they lie. Rank 0 writes the
    files and calls ``after_epoch(epoch)``. Returns the history."""
    if config.training.train_images:  # the first N of the split, as stored in its file
        images, labels = images[:config.training.train_images], labels[:config.training.train_images]
    state, history = build_state(config, images.device, speed, shard, ckpt)
    job = Job(config, paths, history, steps_per_epoch(len(images), config.training.batch_size))
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
            if after_epoch is not None and shard.is_main:
                after_epoch(epoch + 1)
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


def write_checkpoint(state: TrainState, job: Job) -> None:
    """The checkpoint of the state after ``history["epoch"]`` epochs and ``history["step"]`` steps (rank 0)."""
    if state.replicas.shard.is_main:
        save_checkpoint(job.paths["checkpoint"], job.config, model=state.ddpm.model.state_dict(),
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
