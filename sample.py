"""Generate digits with a trained checkpoint.

    python sample.py --digit 7                 # a grid of 10 sevens -> samples_7.png
    python sample.py                           # 10 of every digit, one column per digit -> samples_all.png
    python sample.py --n 100 --npz out.npz     # 1,000 digits as arrays for evaluation

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
from tqdm import tqdm

from checkpoint import load_sampler, newest_checkpoint
from cli import ArgumentParser, UsageError, add_generation_args, atomic_write, describe_sampler, ensure_writable_dir
from cli import non_negative_float, pick_device, positive_int, resolve_sampler, run_cli
from data import save_grid, to_uint8
from ddpm import DDPM
from speed import Speed, autocast


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="sample.py", description="Draw digits from a trained class-conditional DDPM.")
    p.add_argument("--digit", type=int, help="digit to draw (default: every digit)")
    p.add_argument("--n", type=positive_int, default=10, help="images per digit (default 10)")
    p.add_argument("--checkpoint", default="checkpoints",
                   help="checkpoint file, or a folder whose newest *.pt is used (default ./checkpoints)")
    p.add_argument("--guidance", type=non_negative_float, default=2.0,
                   help="classifier-free guidance scale s: 0 unconditional, 1 conditional (default 2)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"),
                   help="ddpm: ancestral, all T steps; ddim: --steps steps (default: ddim, 50 steps)")
    p.add_argument("--steps", type=positive_int, help="DDIM steps (implies --sampler ddim; default 50)")
    add_generation_args(p)
    p.add_argument("--out", help="PNG grid to write (default samples_<digit>.png or samples_all.png)")
    p.add_argument("--npz", help="also save uint8 images (N, 28, 28) and labels (N,) to this .npz file")
    return p.parse_args(argv)


def requested_labels(digit: int | None, n: int, n_classes: int) -> torch.Tensor:
    """``n`` of one digit, or ``n`` rows of ``0..n_classes-1`` (so a 10-wide grid has one digit per column)."""
    if digit is None:
        return torch.arange(n_classes).repeat(n)
    if not 0 <= digit < n_classes:
        raise UsageError(f"--digit must be between 0 and {n_classes - 1} for this checkpoint, got {digit}")
    return torch.full((n,), digit, dtype=torch.long)


def generate(ddpm: DDPM, labels: torch.Tensor, guidance: float, seed: int, batch_size: int,
             device: torch.device, amp: bool = False, **how: Any) -> torch.Tensor:
    """Sample ``labels (N,)`` in batches from one seeded generator: ``(N, 1, 28, 28)`` in ``[-1, 1]``.

    ``how`` is passed to ``DDPM.sample`` (``sampler``, ``steps``, ``eta``); ``amp`` runs the network
    under bf16 autocast.
    """
    generator = torch.Generator().manual_seed(seed)
    chunks = labels.split(batch_size)
    out = []
    for i, chunk in enumerate(chunks):
        bar = lambda steps: tqdm(steps, desc=f"batch {i + 1}/{len(chunks)}", leave=False,  # noqa: E731
                                 file=sys.stderr, dynamic_ncols=True)
        with autocast(device, Speed(amp=amp)):
            x = ddpm.sample(chunk.to(device), guidance, generator=generator, progress=bar, **how)
        out.append(x.float().cpu())
    return torch.cat(out)


def output_targets(args: argparse.Namespace) -> tuple[str, str | None]:
    """The PNG (and optional NPZ) paths, checked to be writable before any sampling starts."""
    out = args.out or f"samples_{'all' if args.digit is None else args.digit}.png"
    for path in (out, args.npz):
        if path is not None:
            ensure_writable_dir(os.path.dirname(os.path.abspath(path)), "output folder")
    return out, args.npz


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    path = newest_checkpoint(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
    device = pick_device(args.device)
    ddpm, ckpt = load_sampler(path, device)
    labels = requested_labels(args.digit, args.n, ckpt["config"]["n_classes"])
    how = resolve_sampler(args.sampler, args.steps, ddpm.T)
    out, npz = output_targets(args)
    started = time.perf_counter()
    x = generate(ddpm, labels, args.guidance, args.seed, args.batch_size, device, args.amp, eta=args.eta, **how)
    seconds = time.perf_counter() - started
    save_grid(x, out, ncol=10)
    if npz is not None:
        atomic_write(npz, lambda tmp: _save_npz(tmp, to_uint8(x).numpy(), labels.numpy()))
    print(f"{len(labels)} images in {seconds:.1f}s ({describe_sampler(how)}, guidance {args.guidance}) "
          f"from {path} (epoch {ckpt['epoch']}) -> {out}"
          + (f", {npz}" if npz else ""), file=sys.stderr)
    return 0


def _save_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
        np.savez_compressed(f, images=images, labels=labels.astype(np.int64))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("sample.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
