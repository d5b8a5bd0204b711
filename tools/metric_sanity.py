"""The quality metric on real digits with the defects it must catch: a table for docs/quality.md.

    python tools/metric_sanity.py --data-root DATA

Takes 1,000 real training digits (100 per class), applies each defect to those very digits (so only the
defect differs), and scores every set with ``metrics.Reference`` and the cached classifier (trained first if
there is none), against the test split. ``tests/test_metric_sanity.py`` checks the same cases.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lib import classifier as clf  # noqa: E402
from lib.cli import ArgumentParser, positive_int, run_cli  # noqa: E402
from lib.data import load_dataset  # noqa: E402
from lib.metrics import Reference, class_matched  # noqa: E402


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def blur(images: torch.Tensor, sigma: float = 0.7) -> torch.Tensor:
    """A 5x5 Gaussian blur of ``uint8 (N, H, W)`` images."""
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * sigma**2))
    kernel = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None]
    return _uint8(F.conv2d(images.float().unsqueeze(1), kernel, padding=2).squeeze(1))


def defects(images: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each defect applied to ``images`` (uint8 ``(N, H, W)``): ``name -> (images, labels)``."""
    g = torch.Generator().manual_seed(0)
    x = images.float()
    white = torch.tensor(255, dtype=torch.uint8)
    keep = labels != 3
    repeated = images.clone()
    repeated[::10] = images[0]
    return {
        "light Gaussian noise (std 15 of 255)": (_uint8(x + 15 * torch.randn(x.shape, generator=g)), labels),
        "speckle (2% of pixels white)": (torch.where(torch.rand(x.shape, generator=g) < 0.02, white, images), labels),
        "faint grey background (+20 of 255)": (_uint8(x + 20 * (x < 128)), labels),
        "slight blur (sigma 0.7 px)": (blur(images), labels),
        "thicker strokes (2x2 dilation)": (_uint8(F.max_pool2d(F.pad(x[:, None], (0, 1, 0, 1)), 2, 1)[:, 0]), labels),
        "class 3 missing (its digits replaced by 5s)": (
            torch.cat((images[keep], images[labels == 5][: int((~keep).sum())])),
            torch.cat((labels[keep], labels[~keep]))),
        "one digit repeated (every tenth image the same)": (repeated, labels),
    }


def two_real_samples(train_labels: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of two disjoint class-balanced draws from the training split."""
    wanted = torch.arange(10).repeat(per_class)
    first = class_matched(wanted, train_labels, seed=0)
    others = torch.ones(len(train_labels), dtype=torch.bool)
    others[first] = False
    return first, others.nonzero().flatten()[class_matched(wanted, train_labels[others], seed=1)]


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog="metric_sanity.py", description="The quality metric on real digits with defects.")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/raw (default ./data)")
    p.add_argument("--per-class", type=positive_int, default=100, help="real digits per class (default 100)")
    p.add_argument("--classifier-cache", default=clf.default_classifier("mnist"))
    args = p.parse_args(argv)
    model, info = clf.load_or_train(args.data_root, args.classifier_cache)
    train, test = (load_dataset(args.data_root, train=split, download=False) for split in (True, False))
    ref = Reference(model, train, test)
    first, second = two_real_samples(train[1], args.per_class)
    cases = {"unchanged (the floor)": (train[0][first], train[1][first]),
             "a second, disjoint real sample": (train[0][second], train[1][second]),
             **defects(train[0][first], train[1][first])}
    print(f"| {len(first)} real training digits | FID | x floor | precision | recall |")
    print("|---|---|---|---|---|")
    floor = None
    for name, (images, labels) in cases.items():
        r = ref.score(images, labels)
        floor = floor or r
        print(f"| {name} | {r['fid']:.3f} | {r['fid'] / floor['fid']:.1f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} |", flush=True)
    print(f"(classifier {100 * info['test_accuracy']:.2f}% on the test split)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("metric_sanity.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
