"""Make a data root whose MNIST training split is a smaller one repeated, for timing full-size epochs.

    python benchmarks/tile_data.py --data-root DATA --size 60000 --out /tmp/mnist60k
    python train.py --data-root /tmp/mnist60k --no-download      # 60,000-image epochs, 10,000 distinct digits

Where MNIST cannot be downloaded, this times the ancestor's 60,000-image epochs honestly (the work per epoch
is the same) without pretending to its data: the copies are exact repeats. The test split is copied as is.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cli import ArgumentParser, positive_int, run_cli  # noqa: E402
from fileio import ensure_writable_dir  # noqa: E402
from data import load_dataset, write_idx  # noqa: E402


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog="tile_data.py", description="Repeat a training split up to --size images.")
    p.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    p.add_argument("--size", type=positive_int, default=60000, help="training images wanted (default 60000)")
    p.add_argument("--out", required=True, help="new data root; MNIST/raw is written in it")
    args = p.parse_args(argv)
    raw = os.path.join(args.out, "MNIST", "raw")
    ensure_writable_dir(raw, "output folder")
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_dataset(args.data_root, train=train, download=False)
        if train:
            index = [i % len(images) for i in range(args.size)]
            images, labels = images[index], labels[index]
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    print(f"{args.out}: {args.size} training images (repeats of the {args.data_root} split), test split copied")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("tile_data.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
