"""Train the class-conditional DDPM on MNIST (or Fashion-MNIST).

    python train.py                                   # the default run: T=500, n_feat=128, 20 epochs
    python train.py --preset cpu --data-root DATA     # the small model, minutes on a 2-core CPU

After every epoch, under --out-dir (NAME = --name, default <T>_<n_feat>): a grid
DDMP_generated_samples_NAME/samples_epoch<e>_NAME.png, loss_plot_NAME.png and checkpoints/ddpm_NAME.pt.
"""

import argparse
import contextlib
import os
import re
import sys
from typing import Any, Sequence

import torch

from lib import distributed
from lib.checkpoint import load_training_checkpoint, run_name
from lib.cli import ArgumentParser, pick_device, run_cli, typed
from lib.config import PRESETS, Config, flag_name, settings
from lib.data import DATASETS, load_dataset
from lib.errors import UsageError
from lib.speed import PLAIN, Speed, default_speed
from lib.training import claim_outputs, output_paths, train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="train.py", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting values for every setting below (default: the original README's run)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                   help="what to learn to draw (default mnist); read from <data-root>/MNIST or FashionMNIST")
    default = PRESETS["default"].flat()
    for name, (_, f) in settings().items():  # one flag per command-line setting: n_feat -> --n-feat
        if f.metadata["flag"]:
            shown = default[name] if isinstance(default[name], str) else f"{default[name]:g}"
            p.add_argument(flag_name(name), dest=name, type=typed(f.metadata["rule"]),
                           help=f"{f.metadata['help']} (default {shown})")
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw or FashionMNIST/raw, downloaded there if missing (default ./data)")
    p.add_argument("--out-dir", default=".", help="where grids, the loss plot and checkpoints go (default .)")
    p.add_argument("--name", help="the run's name in its file names (default <T>_<n_feat>)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue this run from its checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--plain", action="store_true", help="turn the fast path off (fp32, eager, the loss read "
                                                        "back every step): for debugging and comparisons")
    return p.parse_args(argv)


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (those not left to the preset)."""
    return {name: getattr(args, name) for name in settings() if getattr(args, name, None) is not None}


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset, overridden by explicit flags, shaped by the data set, and checked."""
    info = DATASETS[args.dataset]
    return PRESETS[args.preset].override(**explicit_settings(args), image_size=info.image_size,
                                         in_channels=info.channels, n_classes=info.n_classes, dataset=args.dataset,
                                         preset=args.preset).validate()


def checked_name(args: argparse.Namespace, config: Config) -> str:
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise UsageError(f"--name must be letters, digits, '.', '_' and '-' (it names files), got {args.name!r}")
    return args.name or run_name(config)


def start_state(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any] | None:
    """The checkpoint to resume from (``None`` for a fresh run); refuse to clobber an existing run."""
    if args.resume:
        ckpt = load_training_checkpoint(paths["checkpoint"])
        stored, preset = ckpt["config"].flat(), ckpt["config"].preset
        if preset not in PRESETS:
            raise UsageError(f"{paths['checkpoint']!r} was trained with --preset {preset}, which this version no "
                             "longer has; use the version it was trained with to resume it")
        if preset not in (args.preset, "default"):  # "default" is also what files without a preset read
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


def speed_for(args: argparse.Namespace, device: torch.device) -> Speed:
    """The device's fast path (``lib.speed``), compiled with ``--compile``; all of it off with ``--plain``."""
    return PLAIN if args.plain else default_speed(device, compile=args.compile)


def load_training_data(args: argparse.Namespace, dataset: str,
                       shard: distributed.Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split; with several processes rank 0 alone may download it, the others wait."""
    if shard.is_main:
        data = load_dataset(args.data_root, train=True, download=True, name=dataset)
    distributed.barrier(shard)
    return data if shard.is_main else load_dataset(args.data_root, train=True, download=False, name=dataset)


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    config = resolve_config(args)
    paths = output_paths(args.out_dir, checked_name(args, config))
    ckpt = start_state(args, paths)
    config = ckpt["config"] if ckpt is not None else config
    shard, device = distributed.start(pick_device(args.device))
    speed = speed_for(args, device)
    finished = False
    try:
        if device.type == "cpu" and config.model.n_feat >= 128 and shard.is_main:
            print("note: this configuration takes hours on a CPU; '--preset cpu' is sized for one", file=sys.stderr)
        images, labels = load_training_data(args, config.dataset, shard)
        with claim_outputs(args.out_dir, paths) if shard.is_main else contextlib.nullcontext():
            train(config, images.to(device), labels.to(device), paths, speed, shard, ckpt)
        finished = True
    finally:
        distributed.stop(wait=finished)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
