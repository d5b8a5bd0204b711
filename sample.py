"""Generate digits (or Fashion-MNIST items) with a trained checkpoint.

    python sample.py --digit 7                 # a grid of 10 sevens -> samples_7.png
    python sample.py                           # 10 of every digit, one column per digit -> samples_all.png
    python sample.py --n 100 --npz out.npz     # 1,000 digits as arrays for evaluation
    python sample.py --interpolate 6 8 --n 9   # a row morphing a 6 into an 8 -> interpolate_6_8.png
    python sample.py --digit 3 --gif out.gif   # the reverse process, noise to digit, as an animation
    python sample.py --digit 3 --trajectory strip.png   # ... and as a still: one row per image
    python sample.py --guidance-grid 0 1 2 4   # one row per guidance scale, same noise -> guidance_grid.png

Reads the newest checkpoint in ./checkpoints unless --checkpoint is given; when there is none, the bundled
model (pretrained/mnist.safetensors), saying so on stderr. ``--checkpoint pretrained`` asks for the bundled model.

    python sample.py --export-weights mine.safetensors  # the newest checkpoint as a weights file, then exit
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from checkpoint import export_weights, find_checkpoint, load_sampler, model_note
from cli import ArgumentParser, add_sampling_args, non_negative_float, pick_device, positive_int, run_cli
from cli import sampling_from_args, weak_model_from_args
from config import Config, UsageError
from data import DATASETS, grid_image, save_gif, save_grid, to_uint8
from ddpm import DDPM
from fileio import atomic_write, ensure_writable_dir
from generation import Sampling, blended_labels, generate, requested_labels
from speed import default_speed, prepare_process

STRIP_COLUMNS = 10  # states shown per row by --trajectory, from pure noise to the image
DEFAULT_FRAMES = 24  # frames of a --gif
EXAMPLES = (
    "python sample.py --digit 7                 # 10 sevens -> samples_7.png",
    "python sample.py --n 100 --npz out.npz     # 1,000 digits as arrays, for evaluate.py",
    "python sample.py --export-weights mine.safetensors  # the newest checkpoint as a small weights file",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="sample.py", description="Draw images from a trained class-conditional DDPM.",
                       examples=EXAMPLES)
    p.add_argument("--digit", "--class", dest="digit", type=int,
                   help="class to draw: the digit, or the Fashion-MNIST class index (default: every class)")
    p.add_argument("--n", type=positive_int, default=10,
                   help="images per class (default 10); with --interpolate, images in the row")
    p.add_argument("--checkpoint",
                   help="checkpoint file, a folder whose newest *.pt is used, or 'pretrained' for the bundled "
                        "model (default: the newest in ./checkpoints, else the bundled model)")
    add_sampling_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interpolate", nargs=2, type=int, metavar=("A", "B"),
                      help="a row of --n images blending class A's embedding into class B's, same noise")
    mode.add_argument("--guidance-grid", nargs="+", type=non_negative_float, metavar="S",
                      help="one row per guidance scale S, same noise in every row")
    p.add_argument("--gif", help="also write the reverse process as an animated GIF to this file")
    p.add_argument("--frames", type=positive_int,
                   help=f"frames in the --gif, at most one per sampling step plus one (default {DEFAULT_FRAMES})")
    p.add_argument("--trajectory", help=f"also write a PNG strip of {STRIP_COLUMNS} states per image, noise to image")
    p.add_argument("--out", help="PNG to write (default samples_<digit>.png, samples_all.png, "
                                 "interpolate_<A>_<B>.png or guidance_grid.png)")
    p.add_argument("--npz", help="also save uint8 images (N, 28, 28) and labels (N,) to this .npz file")
    export = p.add_argument_group("weights file (instead of drawing)")
    export.add_argument("--export-weights", metavar="OUT",
                        help="write the checkpoint's config and EMA weights (float16) to OUT, a new file, and exit")
    export.add_argument("--about", help="one line on how the model was trained, stored in the weights file "
                                        "(default: what the checkpoint records)")
    return p.parse_args(argv)


def check_class(k: int, flag: str, config: Config) -> int:
    """``k`` if the checkpoint's data set has class ``k``, else a :class:`UsageError` naming its classes."""
    n_classes, dataset = config.model.n_classes, config.dataset
    if not 0 <= k < n_classes:
        names = ", ".join(f"{i} {name}" for i, name in enumerate(DATASETS[dataset].class_names))
        known = f" ({names})" if dataset != "mnist" else ""
        raise UsageError(f"{flag} must be between 0 and {n_classes - 1} for this {dataset} checkpoint{known}, got {k}")
    return k


def frame_indices(states: int, wanted: int) -> list[int]:
    """``min(wanted, states)`` distinct indices from ``0`` to ``states - 1``, evenly spread, both ends kept."""
    if wanted <= 1 or states == 1:
        return [states - 1]
    count = min(wanted, states)
    return torch.linspace(0, states - 1, count, dtype=torch.float64).round().long().tolist()


def save_animation(states: torch.Tensor, path: str, frames: int, ncol: int) -> int:
    """``states (S + 1, N, C, H, W)`` as a GIF of grids; returns the number of frames written."""
    picks = frame_indices(states.shape[0], frames)
    save_gif([grid_image(states[i], ncol) for i in picks], path)
    return len(picks)


def save_strip(states: torch.Tensor, path: str) -> None:
    """One row per image: ``STRIP_COLUMNS`` states from pure noise (left) to the image (right)."""
    picks = frame_indices(states.shape[0], STRIP_COLUMNS)
    rows = states[picks].transpose(0, 1).reshape(-1, *states.shape[2:])
    save_grid(rows, path, ncol=len(picks))


def _save_npz(path: str, images: np.ndarray, labels: np.ndarray, dataset: str) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
        np.savez_compressed(f, images=images, labels=labels.astype(np.int64), dataset=np.array(dataset))


OUTPUTS = {"out": ".png", "trajectory": ".png", "gif": ".gif", "npz": ".npz"}  # flag -> the file type it writes


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output path that names a folder or another file type, before any model is loaded."""
    for name, suffix in OUTPUTS.items():
        path = getattr(args, name)
        if path is None:
            continue
        if os.path.isdir(path):
            raise UsageError(f"--{name} {path!r} is a folder; give a file name ending in {suffix}")
        if not path.lower().endswith(suffix):
            raise UsageError(f"--{name} writes a {suffix[1:].upper()} file: give a name ending in {suffix}, "
                             f"got {path!r}")


def check_modes(args: argparse.Namespace) -> None:
    """Refuse option combinations that have no meaning, before any work."""
    if args.about is not None and not args.export_weights:
        raise UsageError("--about describes a weights file; it goes with --export-weights OUT")
    drawing = [flag for flag, value in (("--out", args.out), ("--npz", args.npz), ("--gif", args.gif),
                                        ("--trajectory", args.trajectory)) if value]
    drawing += [flag for flag, given in (("--digit", args.digit is not None), ("--interpolate", args.interpolate),
                                         ("--guidance-grid", args.guidance_grid)) if given]
    if args.export_weights and drawing:
        raise UsageError(f"--export-weights writes only the weights file; drop {drawing[0]}")
    if args.frames is not None and not args.gif:
        raise UsageError("--frames sets the frames of the --gif; give --gif PATH too")
    special = "--interpolate" if args.interpolate else "--guidance-grid" if args.guidance_grid else None
    if special and args.npz:
        raise UsageError(f"--npz saves labelled samples for evaluate.py; it does not go with {special}")
    if args.guidance_grid and (args.gif or args.trajectory):
        raise UsageError("--gif and --trajectory show one sampling run; they do not go with --guidance-grid")
    if args.interpolate and args.digit is not None:
        raise UsageError("--interpolate A B picks its own classes; drop --digit")
    if args.interpolate and args.n < 2:
        raise UsageError(f"--interpolate needs --n of at least 2 (the two ends), got {args.n}")


def output_targets(args: argparse.Namespace) -> str:
    """The main PNG's path; every output folder is checked to be writable before any sampling starts."""
    if args.interpolate:
        default = f"interpolate_{args.interpolate[0]}_{args.interpolate[1]}.png"
    elif args.guidance_grid:
        default = "guidance_grid.png"
    else:
        default = f"samples_{'all' if args.digit is None else args.digit}.png"
    out = args.out or default
    for path in (out, args.npz, args.gif, args.trajectory):
        if path is not None:
            ensure_writable_dir(os.path.dirname(os.path.abspath(path)), "output folder")
    return out


def draw_guidance_grid(ddpm: DDPM, config: Config, how: Sampling, args: argparse.Namespace, out: str,
                       weak: DDPM | None = None) -> tuple[torch.Tensor, str]:
    """One row per guidance scale of ``--guidance-grid``, each from the same seed (so the same noise)."""
    scales = args.guidance_grid
    row = requested_labels(args.digit, args.n if args.digit is not None else 1, config.model.n_classes)
    x = torch.cat([generate(ddpm, row, replace(how, guidance=s), args.seed, args.batch_size, weak=weak)
                   for s in scales])
    save_grid(x, out, ncol=len(row))
    return x, f"guidance {' '.join(f'{s:g}' for s in scales)}, one row each"


def labels_to_draw(args: argparse.Namespace, config: Config) -> tuple[torch.Tensor, int, list[str] | None]:
    """The labels of the picture, its columns, and its header (class names above an every-class grid)."""
    if args.interpolate:
        a, b = args.interpolate  # checked by _main, before any output folder is made
        return blended_labels(a, b, args.n, config.model.n_classes), args.n, None
    labels = requested_labels(args.digit, args.n, config.model.n_classes)
    named = config.dataset != "mnist" and args.digit is None
    return labels, 10, list(DATASETS[config.dataset].class_names) if named else None


def draw_images(ddpm: DDPM, config: Config, how: Sampling, args: argparse.Namespace,
                out: str, weak: DDPM | None = None) -> tuple[torch.Tensor, str]:
    """A grid (or an ``--interpolate`` row), with the GIF, strip and NPZ asked for."""
    labels, ncol, header = labels_to_draw(args, config)
    wants_states = bool(args.gif or args.trajectory)
    result = generate(ddpm, labels, how, args.seed, args.batch_size, trajectory=wants_states,
                      shared_noise=bool(args.interpolate), weak=weak)
    x, states = result if wants_states else (result, None)
    save_grid(x, out, ncol=ncol, header=header)
    what = f"guidance {how.guidance:g}"
    if args.gif:
        what += f", {save_animation(states, args.gif, args.frames or DEFAULT_FRAMES, ncol)}-frame GIF {args.gif}"
    if args.trajectory:
        save_strip(states, args.trajectory)
        what += f", strip {args.trajectory}"
    if args.npz:
        atomic_write(args.npz, lambda tmp: _save_npz(tmp, to_uint8(x).numpy(), labels.numpy(), config.dataset))
        what += f", {args.npz}"
    return x, what


def export(args: argparse.Namespace) -> int:
    """``--export-weights OUT``: the checkpoint as a weights file (see ``checkpoint.export_weights``)."""
    path, _ = find_checkpoint(args.checkpoint, fallback=False)
    saved = export_weights(path, args.export_weights, args.about)
    print(f"{args.export_weights}: EMA weights of {path} (epoch {saved['epoch']}) in float16, "
          f"{os.path.getsize(args.export_weights) / 1e6:.1f} MB ({saved['about']})", file=sys.stderr)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    check_modes(args)
    check_outputs(args)
    if args.export_weights:
        return export(args)
    path, bundled = find_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    prepare_process(default_speed(device))
    ddpm, ckpt = load_sampler(path, device)
    if args.digit is not None:
        check_class(args.digit, "--digit", ckpt["config"])
    for k in args.interpolate or ():  # before output_targets makes any folder
        check_class(k, "--interpolate", ckpt["config"])
    how = sampling_from_args(args, ddpm.T)
    weak = weak_model_from_args(args, ddpm)
    out = output_targets(args)
    note = model_note(path, ckpt, bundled)  # once every input is known to be good
    if note:
        print(note, file=sys.stderr)
    started = time.perf_counter()
    if args.guidance_grid:
        x, what = draw_guidance_grid(ddpm, ckpt["config"], how, args, out, weak)
    else:
        x, what = draw_images(ddpm, ckpt["config"], how, args, out, weak)
    if weak is not None:
        what += f", weak model {args.weak_model}"
    print(f"{len(x)} images in {time.perf_counter() - started:.1f}s ({how.describe()}, {what}) "
          f"from {path} (epoch {ckpt['epoch']}) -> {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("sample.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
