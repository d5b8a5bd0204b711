"""Measure sample quality: conditional accuracy, FID in a classifier's feature space, and diversity.

    python evaluate.py --checkpoint checkpoints/ddpm_500_32.pt --data-root DATA
    python evaluate.py --checkpoint C --guidance 0 1 2 4 --steps 10 20 50     # one row per combination
    python evaluate.py --checkpoint C --sampler ddpm dpm++ ddim --steps 20     # all T steps vs 20 of the others
    python evaluate.py --npz out.npz --data-root DATA                          # digits written by sample.py

For each row, ``--n`` digits of every class are generated (the same digits ``sample.py --n N`` would draw
with the same seed and settings) and scored with the project's own MNIST classifier (``classifier.py``):

* accuracy: the share the classifier labels as the requested digit (overall, and per digit below the table);
* FID: the Frechet distance between Gaussians fitted to the classifier's 128-d penultimate features of the
  generated digits and of the test split. The "real" row gives the same FID for as many real training
  digits: the floor any model can reach at this sample size;
* diversity: the mean distance between two digits of the same class in that feature space, relative to
  the same for real training digits (1.00 = as varied as real digits; a model drawing one 7 over and over
  scores near 0).
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
from checkpoint import load_sampler, newest_checkpoint
from cli import ArgumentParser, add_sampling_args, pick_device, positive_int, run_cli
from config import UsageError
from data import load_dataset, to_uint8
from ddpm import DDPM, DEFAULT_SAMPLER, SAMPLERS
from generation import Sampling, generate, requested_labels


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of ``features (N, D)``, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` (Heusel et al. 2017).

    ``tr((C1 C2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix ``C1^(1/2) C2 C1^(1/2)``, which has the same spectrum and is stable to take apart.
    """
    values, vectors = torch.linalg.eigh(cov1.double())
    sqrt_c1 = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = sqrt_c1 @ cov2.double() @ sqrt_c1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).double().pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt
    return float(distance.clamp(min=0))


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def within_class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean distance between two different samples of the same class, averaged over classes."""
    spreads = []
    for k in labels.unique():
        f = features[labels == k].double()
        if len(f) > 1:
            spreads.append(torch.cdist(f, f).sum() / (len(f) * (len(f) - 1)))
    return float(torch.stack(spreads).mean())


@torch.inference_mode()
def features_of(model: clf.Classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier features ``(N, 128)`` and predicted labels ``(N,)`` of ``uint8 (N, 28, 28)`` images."""
    model.eval()
    feats = torch.cat([model.features(chunk) for chunk in images.split(1000)])
    return feats, model.head(feats).argmax(1)


class Reference:
    """Real-data statistics: the test split, and a balanced draw of real training digits as the floor."""

    def __init__(self, model: clf.Classifier, data_root: str, n_per_class: int, seed: int,
                 dataset: str = "mnist") -> None:
        test_images, _ = load_dataset(data_root, train=False, download=False, name=dataset)
        self.test_stats = gaussian_stats(features_of(model, test_images)[0])
        images, labels = load_dataset(data_root, train=True, download=False, name=dataset)
        generator = torch.Generator().manual_seed(seed)
        picks = []
        for k in labels.unique().tolist():
            index = (labels == k).nonzero().flatten()
            picks.append(index[torch.randperm(len(index), generator=generator)[:n_per_class]])
        pick = torch.cat(picks)
        features, _ = features_of(model, images[pick])
        self.real_spread = within_class_spread(features, labels[pick])
        self.floor = {"name": f"real training {'digits' if dataset == 'mnist' else 'images'}",
                      "n": len(pick), "accuracy": float("nan"),
                      "fid": frechet_distance(*gaussian_stats(features), *self.test_stats), "diversity": 1.0}

    def score(self, model: clf.Classifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        features, predicted = features_of(model, images)
        correct = predicted == labels
        return {
            "n": len(labels),
            "accuracy": correct.float().mean().item(),
            "per_digit": {int(k): correct[labels == k].float().mean().item() for k in labels.unique()},
            "fid": frechet_distance(*gaussian_stats(features), *self.test_stats),
            "diversity": within_class_spread(features, labels) / self.real_spread,
        }


def sampler_settings(args: argparse.Namespace, T: int) -> list[Sampling]:
    """Every row asked for: each sampler (once per ``--steps`` value if it takes steps) at each guidance scale."""
    samplers = args.sampler or [DEFAULT_SAMPLER]
    takes_steps = [name for name in samplers if SAMPLERS[name].default_steps is not None]
    if args.steps and not takes_steps:  # let the sampler say why it takes no --steps
        Sampling(samplers[0], args.steps[0]).resolve(T)
    rows = []
    for name in samplers:
        for steps in (args.steps or [None]) if name in takes_steps else [None]:
            eta = args.eta if SAMPLERS[name].default_eta is not None else None
            rows += [Sampling(name, steps, eta, guidance, args.amp).resolve(T) for guidance in args.guidance]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| sampler | guidance | n | accuracy | FID | diversity | s / 1,000 digits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        accuracy = "-" if np.isnan(r["accuracy"]) else f"{100 * r['accuracy']:.1f}%"
        seconds = f"{r['seconds_per_1000']:.1f}" if "seconds_per_1000" in r else "-"
        lines.append(f"| {r['name']} | {r.get('guidance', '-')} | {r['n']} | {accuracy} | {r['fid']:.2f} | "
                     f"{r['diversity']:.2f} | {seconds} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="evaluate.py", description="Score generated digits: accuracy, FID, diversity.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="checkpoints",
                        help="checkpoint file, or a folder whose newest ddpm_*.pt is used (default ./checkpoints)")
    source.add_argument("--npz", help="score the digits in this sample.py --npz file instead of generating")
    p.add_argument("--n", type=positive_int, default=100, help="digits per class for each row (default 100)")
    add_sampling_args(p, many=True)
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw (or FashionMNIST/raw), train and test (default ./data)")
    p.add_argument("--classifier-cache",
                   help="the classifier for the checkpoint's dataset "
                        "(default checkpoints/classifier/classifier_<dataset>.pt)")
    p.add_argument("--classifier-epochs", type=positive_int, default=12, help="epochs if it must be trained")
    return p.parse_args(argv)


def read_npz(path: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images ``uint8 (N, 28, 28)``, labels ``(N,)`` and dataset name from a ``sample.py --npz`` file."""
    try:
        with np.load(path) as data:
            images, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]).long()
            dataset = str(data["dataset"]) if "dataset" in data.files else "mnist"
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"cannot read {path!r} as a sample.py --npz file ({err})") from None
    return images, labels, dataset


def score_sampling(ddpm: DDPM, labels: torch.Tensor, how: Sampling, seed: int, batch_size: int,
                   model: clf.Classifier, ref: Reference) -> dict[str, Any]:
    """One table row: generate ``labels`` as ``how`` says, score them, and time the generation."""
    started = time.perf_counter()
    x = generate(ddpm, labels, how, seed, batch_size)
    seconds = time.perf_counter() - started
    return {"name": how.describe(), "guidance": how.guidance, **ref.score(model, to_uint8(x), labels),
            "seconds_per_1000": seconds / len(labels) * 1000}


def score_checkpoint(ddpm: DDPM, rows: list[Sampling], n: int, seed: int, batch_size: int,
                     model: clf.Classifier, ref: Reference) -> list[dict[str, Any]]:
    """A scored row per :class:`Sampling`, ``n`` images of every class each; printed as they finish."""
    labels = requested_labels(None, n, ddpm.eps_model.n_classes)
    scored = []
    for how in rows:
        scored.append(score_sampling(ddpm, labels, how, seed, batch_size, model, ref))
        print(format_table(scored[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return scored


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.npz:
        images, labels, dataset = read_npz(args.npz)
    else:
        path = newest_checkpoint(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
        ddpm, ckpt = load_sampler(path, pick_device(args.device))
        settings = sampler_settings(args, ddpm.T)  # bad flags fail before any classifier training
        dataset = ckpt["config"].dataset
    cache = args.classifier_cache or clf.default_cache(dataset)
    model, info = clf.load_or_train(args.data_root, cache, args.classifier_epochs, dataset)
    ref = Reference(model, args.data_root, args.n, args.seed, dataset)
    if args.npz:
        rows = [{"name": os.path.basename(args.npz), **ref.score(model, images, labels)}]
    else:
        print(f"checkpoint {path} (epoch {ckpt['epoch']}, T={ddpm.T}, n_feat={ckpt['config'].model.n_feat})",
              file=sys.stderr)
        rows = score_checkpoint(ddpm, settings, args.n, args.seed, args.batch_size, model, ref)
    print(f"{dataset} classifier: {100 * info['test_accuracy']:.2f}% on {info['test_size']} test images "
          f"(trained on {info['train_size']}); FID and diversity in its 128-d feature space, "
          f"against the {info['test_size']} test images")
    print(format_table(rows + [ref.floor]))
    for row in rows:
        print(f"per {'digit' if dataset == 'mnist' else 'class'}, {row['name']}, guidance {row.get('guidance', '-')}: "
              + "  ".join(f"{k}:{100 * v:.0f}%" for k, v in row["per_digit"].items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("evaluate.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
