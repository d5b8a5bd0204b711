"""Generate digits (or Fashion-MNIST items) with a trained checkpoint.

    python sample.py --digit 7                 # a grid of 10 sevens -> samples_7.png
    python sample.py                           # 10 of every digit, one column per digit -> samples_all.png
    python sample.py --n 100 --npz out.npz     # 1,000 digits as arrays for evaluation
    python sample.py --interpolate 6 8 --n 9   # a row morphing a 6 into an 8 -> interpolate_6_8.png
    python sample.py --digit 3 --gif out.gif   # the reverse process, noise to digit, as an animation
    python sample.py --digit 3 --trajectory strip.png   # ... and as a still: one row per image
    python sample.py --guidance-grid 0 1 2 4   # one row per guidance scale, same noise -> guidance_grid.png

Reads the newest checkpoint in ./checkpoints unless --checkpoint is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import load_sampler, newest_checkpoint
from cli import ArgumentParser, UsageError, add_generation_args, atomic_write, describe_sampler, ensure_writable_dir
from cli import DEFAULT_SAMPLER, DEFAULT_STEPS, non_negative_float, pick_device, positive_int, resolve_sampler
from cli import run_cli
from data import CLASS_NAMES, grid_image, save_gif, save_grid, to_uint8
from ddpm import DDPM, SAMPLERS
from speed import Speed, autocast

STRIP_COLUMNS = 10  # states shown per row by --trajectory, from pure noise to the image


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="sample.py", description="Draw images from a trained class-conditional DDPM.")
    p.add_argument("--digit", "--class", dest="digit", type=int,
                   help="class to draw: the digit, or the Fashion-MNIST class index (default: every class)")
    p.add_argument("--n", type=positive_int, default=10,
                   help="images per class (default 10); with --interpolate, images in the row")
    p.add_argument("--checkpoint", default="checkpoints",
                   help="checkpoint file, or a folder whose newest *.pt is used (default ./checkpoints)")
    p.add_argument("--guidance", type=non_negative_float, default=2.0,
                   help="classifier-free guidance scale s: 0 unconditional, 1 conditional (default 2)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="ddpm: ancestral, all T steps; ddim or dpm++ (DPM-Solver++(2M)): --steps steps "
                        f"(default: {DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps)")
    p.add_argument("--steps", type=positive_int, help=f"steps of the ddim or dpm++ sampler (default {DEFAULT_STEPS})")
    add_generation_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interpolate", nargs=2, type=int, metavar=("A", "B"),
                      help="a row of --n images blending class A's embedding into class B's, same noise")
    mode.add_argument("--guidance-grid", nargs="+", type=non_negative_float, metavar="S",
                      help="one row per guidance scale S, same noise in every row")
    p.add_argument("--gif", help="also write the reverse process as an animated GIF to this file")
    p.add_argument("--frames", type=positive_int, default=24,
                   help="frames in the --gif, at most one per sampling step plus one (default 24)")
    p.add_argument("--trajectory", help=f"also write a PNG strip of {STRIP_COLUMNS} states per image, noise to image")
    p.add_argument("--out", help="PNG to write (default samples_<digit>.png, samples_all.png, "
                                 "interpolate_<A>_<B>.png or guidance_grid.png)")
    p.add_argument("--npz", help="also save uint8 images (N, 28, 28) and labels (N,) to this .npz file")
    return p.parse_args(argv)


def check_class(k: int, flag: str, dataset: str, n_classes: int) -> int:
    """``k`` if the checkpoint's dataset has class ``k``, else a :class:`UsageError` naming its classes."""
    if not 0 <= k < n_classes:
        names = ", ".join(f"{i} {name}" for i, name in enumerate(CLASS_NAMES.get(dataset, [])))
        known = f" ({names})" if dataset != "mnist" and names else ""
        raise UsageError(f"{flag} must be between 0 and {n_classes - 1} for this {dataset} checkpoint{known}, got {k}")
    return k


def requested_labels(digit: int | None, n: int, n_classes: int, dataset: str = "mnist") -> torch.Tensor:
    """``n`` of one class, or ``n`` rows of ``0..n_classes-1`` (so a 10-wide grid has one class per column)."""
    if digit is None:
        return torch.arange(n_classes).repeat(n)
    return torch.full((n,), check_class(digit, "--digit", dataset, n_classes), dtype=torch.long)


def blended_labels(a: int, b: int, n: int, n_classes: int) -> torch.Tensor:
    """Class weights ``(n, n_classes + 1)`` moving in even steps from one-hot ``a`` to one-hot ``b``.

    The network embeds them as ``(1 - w) * embedding_a + w * embedding_b`` (``unet.ContextUnet``);
    the first and last rows are exactly the pure classes.
    """
    w = torch.linspace(0.0, 1.0, n)[:, None]
    return (1 - w) * F.one_hot(torch.tensor(a), n_classes + 1) + w * F.one_hot(torch.tensor(b), n_classes + 1)


def generate(ddpm: DDPM, labels: torch.Tensor, guidance: float, seed: int, batch_size: int,
             device: torch.device, amp: bool = False, trajectory: bool = False,
             **how: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample ``labels`` (``(N,)`` indices or ``(N, K + 1)`` weights) in batches from one seeded generator.

    Returns ``(N, 1, 28, 28)`` in ``[-1, 1]``, and with ``trajectory`` also every state ``(S + 1, N, 1, 28, 28)``.
    ``how`` is passed to ``DDPM.sample`` (``sampler``, ``steps``, ``eta``, ``shared_noise``); ``amp`` runs
    the network under bf16 autocast.
    """
    generator = torch.Generator().manual_seed(seed)
    chunks = labels.split(batch_size)
    out, states = [], []
    for i, chunk in enumerate(chunks):
        bar = lambda steps: tqdm(steps, desc=f"batch {i + 1}/{len(chunks)}", leave=False,  # noqa: E731
                                 file=sys.stderr, dynamic_ncols=True, disable=None)
        with autocast(device, Speed(amp=amp)):
            result = ddpm.sample(chunk.to(device), guidance, generator=generator, progress=bar,
                                 return_trajectory=trajectory, **how)
        x, steps = result if trajectory else (result, None)
        out.append(x.float().cpu())
        if steps is not None:
            states.append(steps.float())
    if trajectory:
        return torch.cat(out), torch.cat(states, dim=1)
    return torch.cat(out)


def frame_indices(states: int, wanted: int) -> list[int]:
    """``min(wanted, states)`` distinct indices from ``0`` to ``states - 1``, evenly spread, both ends kept."""
    if wanted <= 1 or states == 1:
        return [states - 1]
    count = min(wanted, states)
    return torch.linspace(0, states - 1, count, dtype=torch.float64).round().long().tolist()


def save_animation(states: torch.Tensor, path: str, frames: int, ncol: int) -> int:
    """``states (S + 1, N, 1, 28, 28)`` as a GIF of grids; returns the number of frames written."""
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


def check_modes(args: argparse.Namespace) -> None:
    """Refuse option combinations that have no meaning, before any work."""
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


def draw_guidance_grid(ddpm: DDPM, config: dict[str, Any], args: argparse.Namespace, out: str,
                       run: dict[str, Any], how: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """One row per ``--guidance-grid`` scale, each from the same seed (so the same noise)."""
    n = args.n if args.digit is not None else 1
    row = requested_labels(args.digit, n, config["n_classes"], config.get("dataset", "mnist"))
    x = torch.cat([generate(ddpm, row, s, **run, **how) for s in args.guidance_grid])
    save_grid(x, out, ncol=len(row))
    return x, f"guidance {' '.join(f'{s:g}' for s in args.guidance_grid)}, one row each"


def draw_images(ddpm: DDPM, config: dict[str, Any], args: argparse.Namespace, out: str,
                run: dict[str, Any], how: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """A grid (or an ``--interpolate`` row), with the GIF, strip and NPZ asked for."""
    dataset, n_classes = config.get("dataset", "mnist"), config["n_classes"]
    if args.interpolate:
        a, b = (check_class(k, "--interpolate", dataset, n_classes) for k in args.interpolate)
        labels, ncol, header = blended_labels(a, b, args.n, n_classes), args.n, None
        how = {**how, "shared_noise": True}
    else:
        labels, ncol = requested_labels(args.digit, args.n, n_classes, dataset), 10
        header = CLASS_NAMES[dataset] if dataset != "mnist" and args.digit is None else None
    wants_states = bool(args.gif or args.trajectory)
    result = generate(ddpm, labels, args.guidance, trajectory=wants_states, **run, **how)
    x, states = result if wants_states else (result, None)
    save_grid(x, out, ncol=ncol, header=header)
    what = f"guidance {args.guidance:g}"
    if args.gif:
        what += f", {save_animation(states, args.gif, args.frames, ncol)}-frame GIF {args.gif}"
    if args.trajectory:
        save_strip(states, args.trajectory)
        what += f", strip {args.trajectory}"
    if args.npz:
        atomic_write(args.npz, lambda tmp: _save_npz(tmp, to_uint8(x).numpy(), labels.numpy(), dataset))
        what += f", {args.npz}"
    return x, what


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    check_modes(args)
    path = newest_checkpoint(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
    device = pick_device(args.device)
    ddpm, ckpt = load_sampler(path, device)
    how = {**resolve_sampler(args.sampler, args.steps, ddpm.T), "eta": args.eta}
    run = dict(seed=args.seed, batch_size=args.batch_size, device=device, amp=args.amp)
    out = output_targets(args)
    started = time.perf_counter()
    draw = draw_guidance_grid if args.guidance_grid else draw_images
    x, what = draw(ddpm, ckpt["config"], args, out, run, how)
    print(f"{len(x)} images in {time.perf_counter() - started:.1f}s ({describe_sampler(how)}, {what}) "
          f"from {path} (epoch {ckpt['epoch']}) -> {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("sample.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
