"""Write a training checkpoint as a weights file: what sampling needs, in a safetensors file with a SHA-256.

    python tools/export_weights.py checkpoints/ddpm_500_32.pt mine.safetensors --about "how it was trained"

The file holds the EMA weights in float16 and, in its metadata, the training configuration and a line on how
the model was trained (default: what the checkpoint records); ``sample.py --checkpoint mine.safetensors`` then
draws from it. It is written only where no file is (nothing is overwritten). ``pretrained/mnist.safetensors``,
the bundled model, was made this way.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lib import weights_io  # noqa: E402
from lib.checkpoint import FORMAT, VERSION, find_checkpoint, load_checkpoint  # noqa: E402
from lib.cli import ArgumentParser, run_cli  # noqa: E402
from lib.errors import UsageError  # noqa: E402
from lib.fileio import ensure_writable_dir  # noqa: E402




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

    A safetensors file (``lib.weights_io``): the EMA weights in float16; in its metadata ``format``, ``version``,
    ``kind: "weights"``, ``config`` (JSON), ``epoch``, ``about``, ``steps``, ``final_loss`` and
    ``train_seconds``, and the SHA-256 of it all. ``about`` is one line on how the model was trained
    (default: what the checkpoint records).
    """
    if os.path.exists(dst):
        raise UsageError(f"{dst!r} already exists; remove it or choose another file (nothing is overwritten)")
    ckpt = load_checkpoint(src)
    ema = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
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


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog="export_weights.py", description="Write a checkpoint as a small weights file.")
    p.add_argument("checkpoint", help="a training checkpoint, or a folder whose newest *.pt is used")
    p.add_argument("out", help="the weights file to write (a new file)")
    p.add_argument("--about", help="one line on how the model was trained (default: what the checkpoint records)")
    args = p.parse_args(argv)
    path, _ = find_checkpoint(args.checkpoint, fallback=False)
    saved = export_weights(path, args.out, args.about)
    print(f"{args.out}: EMA weights of {path} (epoch {saved['epoch']}) in float16, "
          f"{os.path.getsize(args.out) / 1e6:.1f} MB ({saved['about']})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("export_weights.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
