"""Score generated digits: accuracy, and FID, precision and recall in a classifier's features.

    python evaluate.py --checkpoint pretrained --data-root DATA                # the bundled model
    python evaluate.py --checkpoint C --sampler ddpm dpm++ --guidance 1 2      # a row per sampler and scale

Each row draws --n digits of every class (as sample.py --n N does) and scores them with the bundled classifier
(docs/results.md); the last row is the floor, as many real training digits.
"""

import argparse
import sys
import time
from typing import Any, Sequence

import torch

from ddpm import DDPM
from lib import classifier as clf
from lib.checkpoint import find_checkpoint, load_sampler, model_note
from lib.cli import ArgumentParser, add_sampling_args, pick_device, positive_int, run_cli
from lib.data import load_dataset, to_uint8
from lib.errors import UsageError
from lib.metrics import Reference
from lib.samplers import DEFAULT_SAMPLER, SAMPLERS, Sampling, generate, requested_labels
from lib.speed import default_speed, prepare_process


def sampler_settings(args: argparse.Namespace, T: int) -> list[Sampling]:
    """Every row asked for: each sampler (once per ``--steps`` value if it takes steps) at each guidance scale."""
    samplers = args.sampler or [DEFAULT_SAMPLER]
    takes_steps = [name for name in samplers if SAMPLERS[name].steps is not None]
    if args.steps and not takes_steps:  # let the sampler say why it takes no --steps
        Sampling(samplers[0], args.steps[0]).resolve(T)
    return [Sampling(name, steps, guidance=guidance).resolve(T) for name in samplers
            for steps in ((args.steps or [None]) if name in takes_steps else [None]) for guidance in args.guidance]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| digits | n | accuracy | FID | precision | recall | s / 1,000 digits |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['seconds_per_1000']:.1f}" if "seconds_per_1000" in r else "-"
        lines.append(f"| {r['name']} | {r['n']} | {100 * r['accuracy']:.1f}% | {r['fid']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {seconds} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="evaluate.py", description=__doc__)
    p.add_argument("--checkpoint", help="checkpoint or weights file, a folder whose newest *.pt is used, or "
                                        "'pretrained' (default: the newest in ./checkpoints, else the bundled model)")
    p.add_argument("--n", type=positive_int, default=100, help="digits per class for each row (default 100)")
    add_sampling_args(p, many=True)
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw (or FashionMNIST/raw), train and test (default ./data)")
    p.add_argument("--classifier-cache",
                   help="the classifier file: for MNIST the bundled one by default; any other is trained on "
                        "--data-root on first use and kept there (default "
                        "checkpoints/classifier/classifier_<dataset>.safetensors)")
    args = p.parse_args(argv)
    if args.n < 2:  # the floor's draw and the nearest-neighbour radii need more than one digit of each
        raise UsageError(f"--n must be at least 2 digits per class, got {args.n}")
    return args


def score_checkpoint(ddpm: DDPM, rows: list[Sampling], labels: torch.Tensor, seed: int, batch_size: int,
                     ref: Reference) -> list[dict[str, Any]]:
    """A scored and timed row per :class:`Sampling` of ``labels``; printed as they finish."""
    scored = []
    for how in rows:
        started = time.perf_counter()
        x = generate(ddpm, labels, how, seed, batch_size)
        seconds = time.perf_counter() - started
        scored.append({"name": how.describe(), **ref.score(to_uint8(x), labels),
                       "seconds_per_1000": seconds / len(labels) * 1000})
        print(format_table(scored[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return scored


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    prepare_process(default_speed(device))
    path, bundled = find_checkpoint(args.checkpoint)
    ddpm, ckpt = load_sampler(path, device)
    settings = sampler_settings(args, ddpm.T)  # bad flags fail before any classifier training
    dataset, labels = ckpt["config"].dataset, requested_labels(None, args.n, ddpm.model.n_classes)
    model, info = clf.load_or_train(args.data_root, args.classifier_cache or clf.default_classifier(dataset),
                                    dataset=dataset)
    train, test = (load_dataset(args.data_root, train=split, download=False, name=dataset) for split in (True, False))
    ref = Reference(model, train, test, args.seed, f"real training {'digits' if dataset == 'mnist' else 'images'}")
    note = model_note(path, ckpt, bundled)  # once every input is known to be good
    if note:
        print(note, file=sys.stderr)
    print(f"checkpoint {path} (epoch {ckpt['epoch']}, T={ddpm.T}, n_feat={ckpt['config'].model.n_feat})",
          file=sys.stderr)
    rows = score_checkpoint(ddpm, settings, labels, args.seed, args.batch_size, ref)
    print(f"{dataset} classifier: {100 * info['test_accuracy']:.2f}% on {info['test_size']} test images "
          f"(trained on {info['train_size']}); FID, precision and recall in its features (lib/metrics.py), "
          f"against the {info['test_size']} test images")
    print(format_table(rows + [ref.floor(labels)]))
    for row in rows:
        print(f"per {'digit' if dataset == 'mnist' else 'class'}, {row['name']}: "
              + "  ".join(f"{k}:{100 * v:.0f}%" for k, v in row["per_digit"].items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("evaluate.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
