"""Draw digits (or Fashion-MNIST items) with a trained model: the newest checkpoint in ./checkpoints, or
--checkpoint, or the bundled model (--checkpoint pretrained), which it uses, saying so, until one is trained.

    python sample.py --digit 7                 # a grid of 10 sevens -> samples_7.png
    python sample.py --n 100 --npz out.npz     # 1,000 digits and their labels as arrays
    python sample.py --interpolate 6 8 --n 9   # a row morphing a 6 into an 8 -> interpolate_6_8.png
"""

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ddpm import DDPM
from lib.checkpoint import find_checkpoint, load_sampler, model_note
from lib.cli import ArgumentParser, add_sampling_args, non_negative_float, pick_device, positive_int, run_cli
from lib.config import Config
from lib.data import DATASETS, grid_image, save_gif, save_grid, to_uint8
from lib.errors import UsageError
from lib.fileio import atomic_write, ensure_writable_dir
from lib.samplers import Sampling, blended_labels, generate, requested_labels
from lib.speed import default_speed, prepare_process

GIF_FRAMES = 24  # frames of a --gif, from pure noise to the image
OUTPUTS = {"out": ".png", "gif": ".gif", "npz": ".npz"}  # flag -> the file type it writes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="sample.py", description=__doc__)
    p.add_argument("--digit", "--class", dest="digit", type=int,
                   help="class to draw: the digit, or the Fashion-MNIST class index (default: every class)")
    p.add_argument("--n", type=positive_int, default=10,
                   help="images per class (default 10); with --interpolate, images in the row")
    p.add_argument("--checkpoint", help="checkpoint or weights file, a folder whose newest *.pt is used, or "
                                        "'pretrained' (default: the newest in ./checkpoints, else the bundled model)")
    add_sampling_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interpolate", nargs=2, type=int, metavar=("A", "B"),
                      help="a row of --n images blending class A's embedding into class B's, same noise")
    mode.add_argument("--guidance-grid", nargs="+", type=non_negative_float, metavar="S",
                      help="one row per guidance scale S, same noise in every row")
    p.add_argument("--gif", help="also write the reverse process as an animated GIF to this file")
    p.add_argument("--out", help="PNG to write (default samples_<digit>.png, samples_all.png, "
                                 "interpolate_<A>_<B>.png or guidance_grid.png)")
    p.add_argument("--npz", help="also save uint8 images (N, 28, 28) and labels (N,) to this .npz file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what has no meaning, and output paths that name a folder or another file type, before any work."""
    for name, suffix in OUTPUTS.items():
        path = getattr(args, name)
        if path is not None and os.path.isdir(path):
            raise UsageError(f"--{name} {path!r} is a folder; give a file name ending in {suffix}")
        if path is not None and not path.lower().endswith(suffix):
            raise UsageError(f"--{name} writes a {suffix[1:].upper()} file: give a name ending in {suffix}, "
                             f"got {path!r}")
    special = "--interpolate" if args.interpolate else "--guidance-grid" if args.guidance_grid else None
    if special and args.npz:
        raise UsageError(f"--npz saves labelled digits; it does not go with {special}")
    if args.guidance_grid and args.gif:
        raise UsageError("--gif shows one sampling run; it does not go with --guidance-grid")
    if args.interpolate and args.digit is not None:
        raise UsageError("--interpolate A B picks its own classes; drop --digit")
    if args.interpolate and args.n < 2:
        raise UsageError(f"--interpolate needs --n of at least 2 (the two ends), got {args.n}")


def check_class(k: int, flag: str, config: Config) -> None:
    """A :class:`UsageError` naming the checkpoint's classes unless it has class ``k``."""
    if not 0 <= k < config.model.n_classes:
        names = ", ".join(f"{i} {name}" for i, name in enumerate(DATASETS[config.dataset].class_names))
        known = f" ({names})" if config.dataset != "mnist" else ""
        raise UsageError(f"{flag} must be between 0 and {config.model.n_classes - 1} for this {config.dataset} "
                         f"checkpoint{known}, got {k}")


def output_path(args: argparse.Namespace) -> str:
    """The main PNG's path; every output folder is checked to be writable before any sampling starts."""
    default = f"samples_{'all' if args.digit is None else args.digit}.png"
    if args.interpolate or args.guidance_grid:
        default = "guidance_grid.png" if args.guidance_grid else "interpolate_{}_{}.png".format(*args.interpolate)
    out = args.out or default
    for path in (out, args.npz, args.gif):
        if path is not None:
            ensure_writable_dir(os.path.dirname(os.path.abspath(path)), "output folder")
    return out


def frame_indices(states: int, wanted: int) -> list[int]:
    """``min(wanted, states)`` distinct indices from ``0`` to ``states - 1``, evenly spread, both ends kept."""
    if wanted <= 1 or states == 1:
        return [states - 1]
    return torch.linspace(0, states - 1, min(wanted, states), dtype=torch.float64).round().long().tolist()


def draw_guidance_grid(ddpm: DDPM, config: Config, how: Sampling, args: argparse.Namespace, out: str) -> str:
    """One row per guidance scale of ``--guidance-grid``, each from the same seed (so the same noise)."""
    row = requested_labels(args.digit, args.n if args.digit is not None else 1, config.model.n_classes)
    x = torch.cat([generate(ddpm, row, replace(how, guidance=s), args.seed, args.batch_size)
                   for s in args.guidance_grid])
    save_grid(x, out, ncol=len(row))
    return f"{len(x)} images, guidance {' '.join(f'{s:g}' for s in args.guidance_grid)}, one row each"


def draw_images(ddpm: DDPM, config: Config, how: Sampling, args: argparse.Namespace, out: str) -> str:
    """A grid (or an ``--interpolate`` row), with the GIF and NPZ asked for."""
    if args.interpolate:
        labels, ncol, header = blended_labels(*args.interpolate, args.n, config.model.n_classes), args.n, None
    else:
        labels, ncol = requested_labels(args.digit, args.n, config.model.n_classes), 10
        named = config.dataset != "mnist" and args.digit is None
        header = list(DATASETS[config.dataset].class_names) if named else None
    result = generate(ddpm, labels, how, args.seed, args.batch_size, trajectory=bool(args.gif),
                      shared_noise=bool(args.interpolate))
    x, states = result if args.gif else (result, None)
    save_grid(x, out, ncol=ncol, header=header)
    what = f"{len(x)} images, {how.describe()}"
    if args.gif:
        picks = frame_indices(states.shape[0], GIF_FRAMES)
        save_gif([grid_image(states[i], ncol) for i in picks], args.gif)
        what += f", {len(picks)}-frame GIF {args.gif}"
    if args.npz:
        images, classes = to_uint8(x).numpy(), labels.numpy().astype(np.int64)
        atomic_write(args.npz, lambda tmp: save_npz(tmp, images, classes, config.dataset))
        what += f", {args.npz}"
    return what


def save_npz(path: str, images: np.ndarray, labels: np.ndarray, dataset: str) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
        np.savez_compressed(f, images=images, labels=labels, dataset=np.array(dataset))


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    check_args(args)
    path, bundled = find_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    prepare_process(default_speed(device))
    ddpm, ckpt = load_sampler(path, device)
    for k, flag in [(args.digit, "--digit")] + [(k, "--interpolate") for k in args.interpolate or ()]:
        if k is not None:
            check_class(k, flag, ckpt["config"])
    how = Sampling(args.sampler or Sampling.sampler, args.steps, guidance=args.guidance).resolve(ddpm.T)
    out = output_path(args)
    note = model_note(path, ckpt, bundled)  # once every input is known to be good
    if note:
        print(note, file=sys.stderr)
    started = time.perf_counter()
    draw = draw_guidance_grid if args.guidance_grid else draw_images
    what = draw(ddpm, ckpt["config"], how, args, out)
    print(f"{what} in {time.perf_counter() - started:.1f}s from {path} (epoch {ckpt['epoch']}) -> {out}",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("sample.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
