"""Train the class-conditional DDPM on MNIST (or Fashion-MNIST): the command line of ``training.train``.

    python train.py                                   # the ancestor's run: T=500, n_feat=128, 20 epochs
    python train.py --preset cpu --data-root ../data  # small configuration for a laptop CPU
    python train.py --resume                          # continue an interrupted run
    python train.py --dataset fashion-mnist           # Fashion-MNIST; file names gain a "fashion-mnist_" prefix

After every epoch, under --out-dir:
    DDMP_generated_samples_<T>_<n_feat>/samples_epoch<e>_<T>_<n_feat>.png   grid, digits 0..9 in columns
    loss_plot_<T>_<n_feat>.png                                               loss per step and per epoch
    checkpoints/ddpm_<T>_<n_feat>.pt                                         written atomically

Ctrl-C or SIGTERM saves a checkpoint after the current step (exit 130 / 143); --resume continues from
that step. A NaN loss or a failed write stops the run (exit 1), keeping the last good checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import replace
from typing import Any, Sequence

import torch

import distributed
from checkpoint import load_training_checkpoint
from cli import ArgumentParser, pick_device, positive_int, run_cli, typed
from config import PRESETS, Config, UsageError, flag_name, settings
from data import DATASETS, load_dataset
from distributed import Shard
from speed import PLAIN, Speed, default_speed, with_switches_off
from training import claim_outputs, output_paths, train

EXAMPLES = (
    "python train.py --preset cpu --data-root DATA      # the small model, minutes on a laptop CPU",
    "python train.py --data-root DATA                   # the original run (T=500, n_feat=128), for a GPU",
    "python train.py --preset cpu --data-root DATA --resume   # continue an interrupted run",
)


def format_default(value: object) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting of ``config.Config`` that the command line sets (``n_feat`` -> ``--n-feat``)."""
    default = PRESETS["default"].flat()
    for name, (_, f) in settings().items():
        if f.metadata["flag"]:
            p.add_argument(flag_name(name), dest=name, type=typed(f.metadata["rule"]),
                           help=f"{f.metadata['help']} (default {format_default(default[name])})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="train.py", description="Train a class-conditional DDPM on MNIST.", examples=EXAMPLES)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting values for every setting below (default: the ancestor's run)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                   help="what to learn to draw (default mnist); read from <data-root>/MNIST or FashionMNIST")
    add_setting_flags(p)
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw or FashionMNIST/raw (default ./data)")
    p.add_argument("--no-download", action="store_true", help="never download the data; fail if it is missing")
    p.add_argument("--out-dir", default=".", help="where grids, the loss plot and checkpoints go (default .)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue this configuration's run from its checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--snapshot-epochs", type=positive_int, nargs="+", default=[], metavar="E",
                   help="also keep a copy of the checkpoint after these epochs, in checkpoints/snapshots/")
    add_speed_flags(p)
    return p.parse_args(argv)


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    fast = p.add_argument_group("speed (the fast path is chosen by device; these turn parts of it off)")
    fast.add_argument("--plain", action="store_true",
                      help="the plain path: fp32, a DataLoader, eager, the loss read back every step")
    fast.add_argument("--no-amp", action="store_true", help="no bf16 autocast")
    layout = fast.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", action="store_true",
                        help="NHWC memory layout (by default only for fp32 on CPUs with AVX-512)")
    layout.add_argument("--no-channels-last", action="store_true", help="NCHW memory layout")
    fast.add_argument("--no-fused", action="store_true", help="Adam without its fused kernel")
    fast.add_argument("--no-device-data", action="store_true", help="feed batches through a DataLoader")
    fast.add_argument("--compile", action="store_true", help="torch.compile the network")
    fast.add_argument("--no-keep-memory", action="store_true",
                      help="let malloc hand freed memory back to the kernel (on a CPU it keeps it by default)")
    fast.add_argument("--log-every", type=positive_int, help="read the loss back every N steps (default 25)")


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (those not left to the preset)."""
    return {name: getattr(args, name) for name in settings() if getattr(args, name, None) is not None}


def speed_from_args(args: argparse.Namespace, device: torch.device) -> Speed:
    """The fast path for ``device`` with the parts the flags turn off."""
    speed = PLAIN if args.plain else default_speed(device, amp=False if args.no_amp else None)
    off = [name for name, flag in (("fused_optimizer", args.no_fused), ("on_device_data", args.no_device_data),
                                   ("channels_last", args.no_channels_last),
                                   ("keep_freed_memory", args.no_keep_memory)) if flag]
    speed = with_switches_off(speed, off)
    return replace(speed, compile=args.compile or speed.compile,
                   channels_last=args.channels_last or speed.channels_last, log_every=args.log_every or speed.log_every)


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset, overridden by explicit flags, shaped by the data set, and checked."""
    info = DATASETS[args.dataset]
    config = PRESETS[args.preset].override(
        **explicit_settings(args), image_size=info.image_size, in_channels=info.channels,
        n_classes=info.n_classes, dataset=args.dataset, preset=args.preset)
    if config.training.grid_steps > config.diffusion.T and args.grid_steps is None:
        config = config.override(grid_steps=config.diffusion.T)  # a preset's default on a short schedule
    return config.validate()


def start_state(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any] | None:
    """The checkpoint to resume from (``None`` for a fresh run); refuse to clobber an existing run."""
    if args.resume:
        ckpt = load_training_checkpoint(paths["checkpoint"])
        stored, preset = ckpt["config"].flat(), ckpt["config"].preset
        # The CPU presets share a checkpoint path (T, n_feat); "default" is also what files without a preset read.
        if preset not in (args.preset, "default"):
            raise UsageError(f"--preset {args.preset} differs from the checkpoint's {preset}; "
                             f"pass --preset {preset} to resume {paths['checkpoint']!r}")
        for key, value in explicit_settings(args).items():
            if stored[key] != value:
                raise UsageError(f"{flag_name(key)} {value} differs from the checkpoint's {stored[key]}; "
                                 f"drop the flag to resume {paths['checkpoint']!r}")
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
    ckpt = start_state(args, paths)
    config = ckpt["config"] if ckpt is not None else config
    shard, device = distributed.start(pick_device(args.device))
    finished = False
    try:
        if device.type == "cpu" and config.model.n_feat >= 128 and shard.is_main:
            print("note: this configuration takes hours on a CPU; '--preset cpu' is sized for one", file=sys.stderr)
        images, labels = load_training_data(args, config.dataset, shard)
        with claim_outputs(args.out_dir, paths) if shard.is_main else contextlib.nullcontext():
            train(config, images.to(device), labels.to(device), paths, speed_from_args(args, device), shard, ckpt,
                  args.snapshot_epochs)
        finished = True
    finally:
        distributed.stop(wait=finished)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
