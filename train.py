"""Train the class-conditional DDPM on MNIST (or Fashion-MNIST).

    python train.py                                   # the ancestor's run: T=500, n_feat=128, 20 epochs
    python train.py --preset cpu --data-root ../data  # small configuration for a laptop CPU
    python train.py --resume                          # continue an interrupted run
    python train.py --dataset fashion-mnist           # Fashion-MNIST; file names gain a "fashion-mnist_" prefix

After every epoch, under --out-dir:
    DDMP_generated_samples_<T>_<n_feat>/samples_epoch<e>_<T>_<n_feat>.png   grid, digits 0..9 in columns
    loss_plot_<T>_<n_feat>.png                                               loss per step and per epoch
    checkpoints/ddpm_<T>_<n_feat>.pt                                         written atomically
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shutil
from dataclasses import replace
import sys
import time
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import distributed  # noqa: E402
from checkpoint import build_ddpm, checkpoint_path, load_checkpoint, run_tag, save_checkpoint  # noqa: E402
from cli import (  # noqa: E402
    DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, ArgumentParser, UsageError, atomic_write, ensure_writable_dir,
    non_negative_float, non_negative_int, pick_device, positive_float, positive_int, run_cli,
)
from data import CLASS_NAMES, DATASETS, load_dataset, save_grid, to_model_range  # noqa: E402
from ddpm import DDPM  # noqa: E402
from distributed import SINGLE, Shard, sum_over_ranks  # noqa: E402
from speed import (  # noqa: E402
    PLAIN, Speed, autocast, batches, default_speed, make_optimizer, prepare_model, with_switches_off,
)

# Every training setting. "default" is the ancestor's run; "cpu" is sized for a 2-core CPU
# (see the README for its measured time). Flags given on the command line win over a preset.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        T=500, n_feat=128, epochs=20, batch_size=256, lr=1e-4, beta_start=1e-4, beta_end=0.02,
        p_uncond=0.1, ema_decay=0.995, guidance=2.0, grid_rows=4, grid_steps=DEFAULT_STEPS, seed=0,
    ),
    "cpu": dict(
        T=500, n_feat=32, epochs=20, batch_size=64, lr=1e-3, beta_start=2e-4, beta_end=0.04,
        p_uncond=0.1, ema_decay=0.995, guidance=2.0, grid_rows=1, grid_steps=DEFAULT_STEPS, seed=0,
    ),
}
# Settings that change the trained model; a resumed run must not contradict them.
TRAINING_KEYS = tuple(PRESETS["default"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="train.py", description="Train a class-conditional DDPM on MNIST.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting values for every setting below (default: the ancestor's run)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                   help="what to learn to draw (default mnist); read from <data-root>/MNIST or FashionMNIST")
    p.add_argument("--T", type=positive_int, help="diffusion steps (default 500)")
    p.add_argument("--n-feat", type=positive_int, help="UNet width, a multiple of 8 (default 128)")
    p.add_argument("--epochs", type=positive_int, help="epochs (default 20)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 256)")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate, decayed linearly per epoch (default 1e-4)")
    p.add_argument("--beta-start", type=positive_float, help="first beta of the linear schedule (default 1e-4)")
    p.add_argument("--beta-end", type=positive_float, help="last beta of the linear schedule (default 0.02)")
    p.add_argument("--p-uncond", type=non_negative_float, help="label dropout probability (default 0.1)")
    p.add_argument("--ema-decay", type=non_negative_float, help="EMA decay of the sampling weights (default 0.995)")
    p.add_argument("--guidance", type=non_negative_float, help="guidance scale of the per-epoch grids (default 2)")
    p.add_argument("--grid-rows", type=positive_int, help="rows of digits 0..9 in each per-epoch grid (default 4)")
    p.add_argument("--grid-steps", type=non_negative_int,
                   help=f"{DEFAULT_SAMPLER} steps for the per-epoch grids; 0 = the full ancestral sampler "
                        f"(default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw or FashionMNIST/raw (default ./data)")
    p.add_argument("--no-download", action="store_true", help="never download the data; fail if it is missing")
    p.add_argument("--out-dir", default=".", help="where grids, the loss plot and checkpoints go (default .)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--resume", action="store_true", help="continue this configuration's run from its checkpoint")
    fast = p.add_argument_group("speed (the fast path is chosen by device; these turn parts of it off)")
    fast.add_argument("--plain", action="store_true",
                      help="the plain path: fp32, a DataLoader, eager, the loss read back every step")
    fast.add_argument("--no-amp", action="store_true", help="no bf16 autocast")
    fast.add_argument("--channels-last", action="store_true",
                      help="NHWC memory layout (off: slower on a CPU here, not yet measured on a GPU)")
    fast.add_argument("--no-fused", action="store_true", help="Adam without its fused kernel")
    fast.add_argument("--no-device-data", action="store_true", help="feed batches through a DataLoader")
    fast.add_argument("--compile", action="store_true", help="torch.compile the network")
    fast.add_argument("--log-every", type=positive_int, help="read the loss back every N steps (default 25)")
    p.add_argument("--overwrite", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--snapshot-epochs", type=positive_int, nargs="+", default=[], metavar="E",
                   help="also keep a copy of the checkpoint after these epochs, in checkpoints/snapshots/")
    return p.parse_args(argv)


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings given on the command line (those not left to the preset)."""
    return {key: getattr(args, key) for key in TRAINING_KEYS if getattr(args, key) is not None}


def speed_from_args(args: argparse.Namespace, device: torch.device) -> Speed:
    """The fast path for ``device`` with the parts the flags turn off."""
    speed = PLAIN if args.plain else default_speed(device)
    off = [name for name, flag in (("amp", args.no_amp), ("fused_optimizer", args.no_fused),
                                   ("on_device_data", args.no_device_data)) if flag]
    speed = with_switches_off(speed, off)
    return replace(speed, compile=args.compile or speed.compile,
                   channels_last=args.channels_last or speed.channels_last, log_every=args.log_every or speed.log_every)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Preset values overridden by explicit flags, checked for consistency."""
    config = {**PRESETS[args.preset], **explicit_settings(args), "in_channels": 1, "n_classes": 10,
              "dataset": args.dataset, "preset": args.preset}
    if config["n_feat"] % 8:
        raise UsageError(f"--n-feat must be a multiple of 8 (GroupNorm uses 8 groups), got {config['n_feat']}")
    if not config["beta_start"] <= config["beta_end"] < 1:
        raise UsageError(f"need --beta-start <= --beta-end < 1, got {config['beta_start']} and {config['beta_end']}")
    if not config["p_uncond"] < 1:
        raise UsageError(f"--p-uncond must be below 1, got {config['p_uncond']}")
    if config["grid_steps"] > config["T"]:
        if args.grid_steps is not None:
            raise UsageError(f"--grid-steps must be at most T={config['T']}, got {config['grid_steps']}")
        config["grid_steps"] = config["T"]  # a preset's default on a short schedule
    if not config["ema_decay"] < 1:
        raise UsageError(f"--ema-decay must be below 1, got {config['ema_decay']}")
    return config


def output_paths(out_dir: str, config: dict[str, Any]) -> dict[str, str]:
    tag = run_tag(config["T"], config["n_feat"], config["dataset"])
    return {
        "grids": os.path.join(out_dir, f"DDMP_generated_samples_{tag}"),
        "grid": os.path.join(out_dir, f"DDMP_generated_samples_{tag}", "samples_epoch{epoch}_" + tag + ".png"),
        "loss_plot": os.path.join(out_dir, f"loss_plot_{tag}.png"),
        "checkpoint": checkpoint_path(out_dir, config["T"], config["n_feat"], config["dataset"]),
        "snapshot": os.path.join(out_dir, "checkpoints", "snapshots", f"ddpm_{tag}_epoch{{epoch}}.pt"),
    }


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model``, parameter by parameter."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    # Warm up: early on the EMA would otherwise remember the random initialisation.
    return min(decay, (1.0 + step) / (10.0 + step))


def train_step(ddpm: DDPM, ema: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, generator: torch.Generator, ema_decay: float, speed: Speed,
               shard: Shard = SINGLE, trainer: nn.Module | None = None,
               global_batch: int | None = None) -> torch.Tensor:
    """One optimisation step on ``uint8 (B, 28, 28)`` images; returns the loss without reading it back.

    With several processes, ``images`` is this rank's slice of a global batch of ``global_batch`` and
    ``trainer`` the DDP-wrapped ``ddpm``; the returned value is this rank's share of the global mean loss.
    """
    x = to_model_range(images)
    if speed.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = global_batch or len(images)
    # drawn for the whole global batch on every rank, so that N processes train as one would
    draws = tuple(shard.part(d) for d in ddpm.draw_training_noise(batch, tuple(x.shape[1:]), x.device, generator))
    with autocast(images.device, speed):
        loss = (trainer or ddpm)(x, labels, draws=draws)
    share = len(images) / batch
    optimizer.zero_grad(set_to_none=True)
    (loss * (share * shard.world)).backward()  # DDP averages over ranks; this weights each by its share
    optimizer.step()
    update_ema(ema, ddpm.eps_model, ema_decay)
    return (loss * share).detach()


def train_epoch(ddpm: DDPM, ema: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor, config: dict[str, Any], epoch: int, step: int, speed: Speed,
                shard: Shard = SINGLE, trainer: nn.Module | None = None) -> list[float]:
    """One pass over ``images (N, 28, 28) uint8`` in a seeded random order; returns the per-step losses."""
    device, size = images.device, config["batch_size"]
    order_gen = torch.Generator().manual_seed(config["seed"] * 7919 + epoch)
    noise_gen = torch.Generator(device=device).manual_seed(config["seed"] * 7919 + epoch + 1)
    for group in optimizer.param_groups:
        group["lr"] = config["lr"] * (1 - epoch / config["epochs"])
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet read back: reading one waits for the device
    bar = tqdm(total=-(-len(images) // size), desc=f"epoch {epoch + 1}/{config['epochs']}",
               dynamic_ncols=True, file=sys.stderr, disable=not shard.is_main)
    ddpm.train()
    for i, (x, y) in enumerate(batches(images, labels, size, order_gen, speed, device, shard)):
        decay = ema_decay_at(step + i, config["ema_decay"])
        global_batch = min(size, len(images) - i * size)
        pending.append(train_step(ddpm, ema, optimizer, x, y, noise_gen, decay, speed, shard, trainer, global_batch))
        if len(pending) == speed.log_every:
            losses += sum_over_ranks(torch.stack(pending).float(), shard).tolist()
            bar.update(len(pending))
            pending.clear()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    losses += sum_over_ranks(torch.stack(pending).float(), shard).tolist() if pending else []
    bar.update(len(pending))
    bar.close()
    return losses


def sample_grid(ema: nn.Module, config: dict[str, Any], path: str, device: torch.device) -> None:
    """Draw ``grid_rows`` rows of digits 0..9 with the EMA weights, the same noise every epoch.

    The default few-step sampler with ``grid_steps`` steps: the grid is a progress picture, and a full
    ancestral run each epoch would cost more than the epoch itself on a CPU.
    """
    sampler = DDPM(ema, config["T"], config["beta_start"], config["beta_end"]).to(device)
    labels = torch.arange(config["n_classes"], device=device).repeat(config["grid_rows"])
    ema.eval()
    how = dict(sampler=DEFAULT_SAMPLER, steps=config["grid_steps"], eta=DEFAULT_ETA) if config["grid_steps"] else {}
    x = sampler.sample(labels, config["guidance"], generator=torch.Generator().manual_seed(config["seed"]), **how)
    header = None if config["dataset"] == "mnist" else CLASS_NAMES[config["dataset"]]
    save_grid(x, path, ncol=config["n_classes"], header=header)


def plot_losses(losses: list[float], steps_per_epoch: int, path: str, title: str) -> None:
    """Loss per step (thin) and mean loss per epoch (dots), against epochs."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = torch.arange(1, len(losses) + 1) / steps_per_epoch
    ax.plot(steps.tolist(), losses, lw=0.6, alpha=0.5, label="per step")
    per_epoch = [sum(losses[i:i + steps_per_epoch]) / len(losses[i:i + steps_per_epoch])
                 for i in range(0, len(losses), steps_per_epoch)]
    ax.plot(list(range(1, len(per_epoch) + 1)), per_epoch, "o-", label="epoch mean")
    ax.set(xlabel="epoch", ylabel="MSE loss (noise)", yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def start_state(args: argparse.Namespace, config: dict[str, Any], paths: dict[str, str]) -> dict[str, Any] | None:
    """The checkpoint to resume from (``None`` for a fresh run); refuse to clobber an existing run."""
    if args.resume:
        ckpt = load_checkpoint(paths["checkpoint"])
        for key, value in explicit_settings(args).items():
            if ckpt["config"].get(key) != value:
                raise UsageError(f"--{key.replace('_', '-')} {value} differs from the checkpoint's "
                                 f"{ckpt['config'].get(key)}; drop the flag to resume {paths['checkpoint']!r}")
        return ckpt
    if os.path.exists(paths["checkpoint"]) and not args.overwrite:
        raise UsageError(f"{paths['checkpoint']!r} already exists; pass --resume to continue it "
                         "or --overwrite to start over")
    return None


def load_training_data(args: argparse.Namespace, dataset: str, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split; with several processes rank 0 alone may download it, the others wait."""
    if shard.is_main:
        data = load_dataset(args.data_root, train=True, download=not args.no_download, name=dataset)
    distributed.barrier(shard)
    return data if shard.is_main else load_dataset(args.data_root, train=True, download=False, name=dataset)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    config = resolve_config(args)
    paths = output_paths(args.out_dir, config)
    ckpt = start_state(args, config, paths)
    if ckpt is not None:
        config = ckpt["config"]
    shard, device = distributed.start(pick_device(args.device))
    finished = False
    try:
        if device.type == "cpu" and config["n_feat"] >= 128 and shard.is_main:
            print("note: this configuration takes hours on a CPU; '--preset cpu' is sized for one", file=sys.stderr)
        images, labels = load_training_data(args, config["dataset"], shard)
        for folder in (args.out_dir, paths["grids"], os.path.dirname(paths["checkpoint"])) if shard.is_main else ():
            ensure_writable_dir(folder, "output folder")
        train(config, ckpt, images.to(device), labels.to(device), paths, device, speed_from_args(args, device), shard,
              args.snapshot_epochs)
        finished = True
    finally:
        distributed.stop(wait=finished)
    return 0


def train(config: dict[str, Any], ckpt: dict[str, Any] | None, images: torch.Tensor, labels: torch.Tensor,
          paths: dict[str, str], device: torch.device, speed: Speed = PLAIN, shard: Shard = SINGLE,
          snapshot_epochs: Sequence[int] = ()) -> None:
    """Run (or continue) training to ``config['epochs']``; rank 0 writes every per-epoch file."""
    torch.manual_seed(config["seed"])
    ddpm = build_ddpm(config).to(device)
    ema = copy.deepcopy(ddpm.eps_model).requires_grad_(False)
    prepare_model(ddpm.eps_model, speed)
    optimizer = make_optimizer(ddpm.eps_model, config["lr"], speed)
    history: dict[str, Any] = {"losses": [], "epoch": 0, "train_seconds": 0.0}
    if ckpt is not None:
        ddpm.eps_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = {key: ckpt[key] for key in history}
    trainer = distributed.wrap(ddpm, shard, device)
    steps_per_epoch = -(-len(images) // config["batch_size"])
    log = functools.partial(print, file=sys.stderr) if shard.is_main else lambda *a, **k: None
    per_rank = f" = {shard.world} processes x ~{config['batch_size'] // shard.world}" if shard.world > 1 else ""
    log(f"training on {len(images)} images, {device}, T={config['T']} n_feat={config['n_feat']} "
        f"batch {config['batch_size']}{per_rank}, epochs {history['epoch'] + 1}..{config['epochs']}; {speed}")
    for epoch in range(history["epoch"], config["epochs"]):
        started = time.perf_counter()
        history["losses"] += train_epoch(ddpm, ema, optimizer, images, labels, config, epoch,
                                         len(history["losses"]), speed, shard, trainer)
        if shard.is_main:
            draw_progress(ema, config, history["losses"], epoch + 1, paths, device, steps_per_epoch)
        history["epoch"] = epoch + 1
        history["train_seconds"] += time.perf_counter() - started
        if shard.is_main:
            save_checkpoint(paths["checkpoint"], config=config, model=ddpm.eps_model.state_dict(),
                            ema=ema.state_dict(), optimizer=optimizer.state_dict(), **history)
            if epoch + 1 in snapshot_epochs:
                keep_snapshot(paths, epoch + 1)
        mean = sum(history["losses"][-steps_per_epoch:]) / steps_per_epoch
        log(f"epoch {epoch + 1}/{config['epochs']}: loss {mean:.4f}, "
            f"{time.perf_counter() - started:.1f}s, total {history['train_seconds']:.1f}s")
    log(f"done: {paths['checkpoint']}")


def keep_snapshot(paths: dict[str, str], epoch: int) -> None:
    """A copy of the checkpoint just written, kept as ``snapshots/ddpm_<T>_<n_feat>_epoch<e>.pt``."""
    target = paths["snapshot"].format(epoch=epoch)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(paths["checkpoint"], tmp))


def draw_progress(ema: nn.Module, config: dict[str, Any], losses: list[float], epoch: int,
                  paths: dict[str, str], device: torch.device, steps_per_epoch: int) -> None:
    """The sample grid of ``epoch`` and the loss plot so far."""
    sample_grid(ema, config, paths["grid"].format(epoch=epoch), device)
    plot_losses(losses, steps_per_epoch, paths["loss_plot"], f"DDPM T={config['T']}, n_feat={config['n_feat']}"
                + ("" if config["dataset"] == "mnist" else f", {config['dataset']}"))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
