"""Data in and images out: the two places where pixels change range.

* In: :func:`load_dataset` reads MNIST through torchvision as a ``uint8`` tensor, and
  :func:`to_model_range` maps a batch to floats in ``[-1, 1]``, the range of ``ddpm.py``.
* Out: :func:`to_uint8` maps model output back to ``uint8`` (white digit on black, like
  MNIST), and :func:`save_grid` writes a PNG grid with dark digits on white.
"""

from __future__ import annotations

import os

import torch
import torchvision
from torchvision.utils import make_grid
from PIL import Image

from cli import UsageError, atomic_write

# dataset name -> (torchvision class, its folder under the data root)
DATASETS = {
    "mnist": (torchvision.datasets.MNIST, "MNIST"),
}
RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def load_dataset(
    root: str, train: bool = True, download: bool = True, name: str = "mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split with torchvision: ``images (N, 28, 28) uint8``, ``labels (N,) int64``.

    Nothing is downloaded when the files are already in ``<root>/<folder>/raw``;
    when they are missing and cannot be downloaded, a :class:`UsageError` says where to put them.
    """
    cls, folder = DATASETS[name]
    raw = os.path.join(root, folder, "raw")
    missing = (
        f"{folder} files not found in {raw!r}: put {', '.join(RAW_FILES)} (or their .gz) there, "
        f"or point --data-root at a folder that holds {folder}/raw"
    )
    try:
        dataset = cls(root, train=train, download=False)
    except RuntimeError:
        if not download:
            raise UsageError(missing) from None
        dataset = _download(cls, root, train, missing)
    except Exception as err:  # a truncated or foreign file in raw/
        raise UsageError(f"cannot read {folder} in {raw!r} ({err}); replace the damaged files") from None
    return dataset.data, dataset.targets.long()


def _download(cls: type, root: str, train: bool, missing: str) -> torchvision.datasets.VisionDataset:
    try:
        return cls(root, train=train, download=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"could not download ({reason}); {missing}") from None


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """``uint8 (B, 28, 28)`` in ``[0, 255]`` -> ``float (B, 1, 28, 28)`` in ``[-1, 1]``."""
    return images.unsqueeze(1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model output ``(B, 1, 28, 28)`` around ``[-1, 1]`` -> ``uint8 (B, 28, 28)``, white digit on black."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).squeeze(1).cpu()


def save_grid(x: torch.Tensor, path: str, ncol: int = 10) -> None:
    """Write images ``(B, 1, 28, 28)`` in ``[-1, 1]`` as a PNG grid, ``ncol`` per row, dark digits on white."""
    inverted = 255 - to_uint8(x)
    grid = make_grid(inverted.unsqueeze(1), nrow=ncol, padding=2, pad_value=255)
    image = Image.fromarray(grid[0].numpy(), mode="L")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
