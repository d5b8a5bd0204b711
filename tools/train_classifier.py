"""Train the classifier that scores generated digits (or load the one there is), and print its test accuracy.

    python tools/train_classifier.py --data-root DATA --cache pretrained/mnist_classifier.safetensors  # the bundled one
    python tools/train_classifier.py --data-root DATA --dataset fashion-mnist    # evaluate.py's, for Fashion-MNIST
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lib.classifier import default_classifier, load_or_train  # noqa: E402
from lib.cli import ArgumentParser, positive_int, run_cli  # noqa: E402
from lib.data import DATASETS  # noqa: E402
from lib.speed import default_speed, prepare_process  # noqa: E402


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog="train_classifier.py", description="Train (or load) the classifier evaluate.py uses.")
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw or FashionMNIST/raw (default ./data)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist", help="default mnist")
    p.add_argument("--cache", help="the classifier's file (default: the bundled one for MNIST, else "
                                   "checkpoints/classifier/classifier_<dataset>.safetensors)")
    p.add_argument("--epochs", type=positive_int, default=12, help="training epochs (default 12)")
    args = p.parse_args(argv)
    prepare_process(default_speed(torch.device("cpu")))  # it trains on the CPU
    _, info = load_or_train(args.data_root, args.cache or default_classifier(args.dataset), args.epochs, args.dataset)
    print(f"classifier ({args.dataset}): test accuracy {info['test_accuracy']:.4f} on {info['test_size']} test "
          f"images (trained on {info['train_size']} in {info['train_seconds']:.0f}s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("train_classifier.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
