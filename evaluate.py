"""Measure sample quality: accuracy, FID, precision and recall in a classifier's feature space, diversity.

    python evaluate.py --checkpoint checkpoints/ddpm_500_32.pt --data-root DATA
    python evaluate.py --checkpoint C --guidance 0 1 2 4 --steps 10 20 50     # one row per combination
    python evaluate.py --checkpoint C --sampler ddpm dpm++ ddim --steps 20     # all T steps vs 20 of the others
    python evaluate.py --npz out.npz --data-root DATA                          # digits written by sample.py
    python evaluate.py --checkpoint pretrained --data-root DATA                # the bundled model

For each row, ``--n`` digits of every class are generated (the same digits ``sample.py --n N`` would draw
with the same seed and settings) and scored with the project's own MNIST classifier (``classifier.py``; the
bundled one unless --classifier-cache names another)
by ``metrics.Reference``: accuracy (overall, and per digit below the table), FID in features taken at three
depths of the classifier, the FID of its penultimate features alone (the earlier metric), precision,
recall and diversity. The last row is the floor: the same metrics for as many real training digits of the
same classes, what a perfect model would score at that sample size. See ``metrics.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch

import classifier as clf
from checkpoint import find_checkpoint, load_sampler, model_note
from cli import ArgumentParser, add_sampling_args, interval_from_args, pick_device, positive_int, run_cli
from cli import weak_model_from_args
from config import UsageError, flag_name
from data import DATASETS, load_dataset, to_uint8
from ddpm import DDPM, DEFAULT_SAMPLER, SAMPLERS
from generation import Sampling, generate, requested_labels
from metrics import Reference
from speed import default_speed, prepare_process


# The sampling flags (cli.add_sampling_args) that say how to generate, so mean nothing for --npz digits.
GENERATING = ("sampler", "steps", "eta", "guidance", "guidance_interval", "autoguidance", "weak_model", "amp",
              "batch_size")

EXAMPLES = (
    "python evaluate.py --checkpoint pretrained --data-root DATA      # score the bundled model",
    "python evaluate.py --data-root DATA --sampler ddpm dpm++ --steps 20   # the newest checkpoint, two samplers",
    "python evaluate.py --npz out.npz --data-root DATA               # digits written by sample.py --npz",
)


def sampler_settings(args: argparse.Namespace, T: int) -> list[Sampling]:
    """Every row asked for: each sampler (once per ``--steps`` value if it takes steps) at each guidance scale
    and each autoguidance scale."""
    samplers = args.sampler or [DEFAULT_SAMPLER]
    interval = interval_from_args(args)
    takes_steps = [name for name in samplers if SAMPLERS[name].default_steps is not None]
    if args.steps and not takes_steps:  # let the sampler say why it takes no --steps
        Sampling(samplers[0], args.steps[0]).resolve(T)
    if args.eta is not None and all(SAMPLERS[name].default_eta is None for name in samplers):
        Sampling(samplers[0], eta=args.eta).resolve(T)  # ... or no --eta
    rows = []
    for name in samplers:
        for steps in (args.steps or [None]) if name in takes_steps else [None]:
            eta = args.eta if SAMPLERS[name].default_eta is not None else None
            rows += [Sampling(name, steps, eta, guidance, args.amp, interval, a).resolve(T)
                     for guidance in args.guidance for a in args.autoguidance]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| sampler | guidance | n | accuracy | FID | precision | recall | diversity | FID, penultimate only "
             "| s / 1,000 digits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['seconds_per_1000']:.1f}" if "seconds_per_1000" in r else "-"
        lines.append(f"| {r['name']} | {r.get('guidance', '-')} | {r['n']} | {100 * r['accuracy']:.1f}% | "
                     f"{r['fid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['diversity']:.2f} | "
                     f"{r['fid_high']:.2f} | {seconds} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="evaluate.py", description="Score generated digits: accuracy, FID, diversity.",
                       examples=EXAMPLES)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint",
                        help="checkpoint file, a folder whose newest *.pt is used, or 'pretrained' for the bundled "
                             "model (default: the newest in ./checkpoints, else the bundled model)")
    source.add_argument("--npz", help="score the digits in this sample.py --npz file instead of generating")
    p.add_argument("--n", type=positive_int, default=100, help="digits per class for each row (default 100)")
    add_sampling_args(p, many=True)
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw (or FashionMNIST/raw), train and test (default ./data)")
    p.add_argument("--classifier-cache",
                   help="the classifier file: for MNIST the bundled one by default; any other is trained on "
                        "--data-root on first use and kept there (default "
                        "checkpoints/classifier/classifier_<dataset>.safetensors)")
    p.add_argument("--classifier-epochs", type=positive_int, default=12, help="epochs if it must be trained")
    args = p.parse_args(argv)
    if args.n < 2:  # the diversity compares two digits of one class
        raise UsageError(f"--n must be at least 2 digits per class, got {args.n}")
    given = [name for name in GENERATING if getattr(args, name) != p.get_default(name)]
    if args.npz and given:
        raise UsageError(f"--npz scores digits already drawn; {flag_name(given[0])} applies only when "
                         "generating from --checkpoint")
    return args


def read_npz(path: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images ``uint8 (N, 28, 28)``, labels ``(N,)`` and dataset name from a ``sample.py --npz`` file."""
    try:
        with np.load(path) as data:
            images, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]).long()
            dataset = str(data["dataset"]) if "dataset" in data.files else "mnist"
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot read {path!r} as a sample.py --npz file ({err})") from None
    check_npz(path, images, labels, dataset)
    return images, labels, dataset


def check_npz(path: str, images: torch.Tensor, labels: torch.Tensor, dataset: str) -> None:
    """A one-line :class:`UsageError` unless the file holds what ``sample.py --npz`` writes, enough to score."""
    if dataset not in DATASETS:
        raise UsageError(f"{path!r}: its dataset {dataset!r} is not one of {', '.join(sorted(DATASETS))}")
    info = DATASETS[dataset]
    shape = (info.image_size, info.image_size)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != shape:
        raise UsageError(f"{path!r}: images must be uint8 of shape (N, {shape[0]}, {shape[1]}), "
                         f"got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise UsageError(f"{path!r}: {len(images)} images but labels of shape {tuple(labels.shape)}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < info.n_classes:
        raise UsageError(f"{path!r}: labels must be classes 0..{info.n_classes - 1}")
    if len(labels) == 0 or int(torch.bincount(labels)[labels.unique()].min()) < 2:  # the diversity needs pairs
        raise UsageError(f"{path!r}: every class in it needs at least 2 images (sample.py --n 2 or more)")


def score_sampling(ddpm: DDPM, labels: torch.Tensor, how: Sampling, seed: int, batch_size: int,
                   ref: Reference, weak: DDPM | None = None) -> dict[str, Any]:
    """One table row: generate ``labels`` as ``how`` says, score them, and time the generation."""
    started = time.perf_counter()
    x = generate(ddpm, labels, how, seed, batch_size, weak=weak)
    seconds = time.perf_counter() - started
    return {"name": how.describe(), "guidance": how.guidance, **ref.score(to_uint8(x), labels),
            "seconds_per_1000": seconds / len(labels) * 1000}


def score_checkpoint(ddpm: DDPM, rows: list[Sampling], labels: torch.Tensor, seed: int, batch_size: int,
                     ref: Reference, weak: DDPM | None = None) -> list[dict[str, Any]]:
    """A scored row per :class:`Sampling` of ``labels``; printed as they finish."""
    scored = []
    for how in rows:
        scored.append(score_sampling(ddpm, labels, how, seed, batch_size, ref, weak))
        print(format_table(scored[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return scored


def reference(model: clf.Classifier, data_root: str, seed: int, dataset: str) -> Reference:
    """Real digits of ``data_root``: the training split for the floor, the test split to score against."""
    train = load_dataset(data_root, train=True, download=False, name=dataset)
    test = load_dataset(data_root, train=False, download=False, name=dataset)
    return Reference(model, train, test, seed, f"real training {'digits' if dataset == 'mnist' else 'images'}")


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    prepare_process(default_speed(device))
    if args.npz:
        images, labels, dataset = read_npz(args.npz)
    else:
        path, bundled = find_checkpoint(args.checkpoint)
        ddpm, ckpt = load_sampler(path, device)
        settings = sampler_settings(args, ddpm.T)  # bad flags fail before any classifier training
        weak = weak_model_from_args(args, ddpm)
        dataset, labels = ckpt["config"].dataset, requested_labels(None, args.n, ddpm.eps_model.n_classes)
    cache = args.classifier_cache or clf.default_classifier(dataset)
    model, info = clf.load_or_train(args.data_root, cache, args.classifier_epochs, dataset)
    ref = reference(model, args.data_root, args.seed, dataset)
    if args.npz:
        rows = [{"name": os.path.basename(args.npz), **ref.score(images, labels)}]
    else:
        note = model_note(path, ckpt, bundled)  # once every input is known to be good
        if note:
            print(note, file=sys.stderr)
        print(f"checkpoint {path} (epoch {ckpt['epoch']}, T={ddpm.T}, n_feat={ckpt['config'].model.n_feat})"
              + (f", weak model {args.weak_model}" if weak is not None else ""), file=sys.stderr)
        rows = score_checkpoint(ddpm, settings, labels, args.seed, args.batch_size, ref, weak)
    print(f"{dataset} classifier: {100 * info['test_accuracy']:.2f}% on {info['test_size']} test images "
          f"(trained on {info['train_size']}); FID, precision and recall in its features (metrics.py), "
          f"against the {info['test_size']} test images")
    print(format_table(rows + [ref.floor(labels)]))
    for row in rows:
        print(f"per {'digit' if dataset == 'mnist' else 'class'}, {row['name']}, guidance {row.get('guidance', '-')}: "
              + "  ".join(f"{k}:{100 * v:.0f}%" for k, v in row["per_digit"].items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("evaluate.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
