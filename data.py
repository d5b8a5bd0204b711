"""Data in and images out: the two places where pixels change range.

* In: :func:`load_dataset` reads MNIST through torchvision as a ``uint8`` tensor, and
  :func:`to_model_range` maps a batch to floats in ``[-1, 1]``, the range of ``ddpm.py``.
* Out: :func:`to_uint8` maps model output back to ``uint8`` (white digit on black, like
  MNIST), and :func:`save_grid` writes a PNG grid with dark digits on white.
"""

from __future__ import annotations

import gzip
import os
import shutil

import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from cli import UsageError, atomic_write

# dataset name -> (torchvision class, its folder under the data root)
DATASETS = {
    "mnist": (torchvision.datasets.MNIST, "MNIST"),
    "fashion-mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST"),
}
# names of the classes 0..9, as grids and messages show them
CLASS_NAMES = {
    "mnist": [str(k) for k in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


def load_dataset(
    root: str, train: bool = True, download: bool = True, name: str = "mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split with torchvision: ``images (N, 28, 28) uint8``, ``labels (N,) int64``.

    Nothing is downloaded when the files (or their ``.gz``, which are unpacked in place) are
    already in ``<root>/<folder>/raw``; when they are missing and cannot be downloaded, a
    :class:`UsageError` says where to put them.
    """
    cls, folder = DATASETS[name]
    raw = os.path.join(root, folder, "raw")
    _unpack_local_gz(raw)
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


def _unpack_local_gz(raw: str) -> None:
    # torchvision reads only unpacked files unless it may download; unpacking is local work
    for name in RAW_FILES:
        packed, unpacked = os.path.join(raw, name + ".gz"), os.path.join(raw, name)
        if os.path.isfile(packed) and not os.path.exists(unpacked):
            try:
                atomic_write(unpacked, lambda tmp: _gunzip(packed, tmp))
            except Exception as err:
                raise UsageError(f"cannot unpack {packed!r} ({err}); unpack it yourself or make "
                                 f"{raw!r} writable") from None


def _gunzip(packed: str, target: str) -> None:
    with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _download(cls: type, root: str, train: bool, missing: str) -> torchvision.datasets.VisionDataset:
    try:
        return cls(root, train=train, download=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"could not download ({reason}); {missing}") from None


def write_idx(path: str, array: torch.Tensor) -> None:
    """Write a uint8 tensor in the IDX format MNIST ships in (big-endian sizes, magic 0x08 = unsigned byte)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    atomic_write(path, lambda tmp: _write_bytes(tmp, header + array.to(torch.uint8).contiguous().numpy().tobytes()))


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """``uint8 (B, 28, 28)`` in ``[0, 255]`` -> ``float (B, 1, 28, 28)`` in ``[-1, 1]``."""
    return images.unsqueeze(1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model output ``(B, 1, 28, 28)`` around ``[-1, 1]`` -> ``uint8 (B, 28, 28)``, white digit on black."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).squeeze(1).cpu()


def grid_image(x: torch.Tensor, ncol: int = 10, header: list[str] | None = None) -> Image.Image:
    """Images ``(B, 1, 28, 28)`` in ``[-1, 1]`` as one picture, ``ncol`` per row, dark on white.

    With ``header`` (one name per column) the grid is drawn at twice the size under a row of names.
    """
    inverted = 255 - to_uint8(x)
    grid = make_grid(inverted.unsqueeze(1), nrow=ncol, padding=2, pad_value=255)
    image = Image.fromarray(grid[0].numpy(), mode="L")
    if header is None:
        return image
    image = image.resize((image.width * 2, image.height * 2), Image.NEAREST)
    framed = Image.new("L", (image.width, image.height + 16), 255)
    framed.paste(image, (0, 16))
    draw, font, column = ImageDraw.Draw(framed), ImageFont.load_default(), image.width / ncol
    for k, name in enumerate(header):
        draw.text(((k + 0.5) * column, 8), name, fill=0, font=font, anchor="mm")
    return framed


def save_grid(x: torch.Tensor, path: str, ncol: int = 10, header: list[str] | None = None) -> None:
    """Write :func:`grid_image` of ``x (B, 1, 28, 28)`` as a PNG (atomically)."""
    image = grid_image(x, ncol, header)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_gif(frames: list[Image.Image], path: str, frame_ms: int = 80, hold_ms: int = 1500) -> None:
    """Write ``frames`` as a looping GIF, holding the last one for ``hold_ms`` (atomically).

    Grey levels are cut to 16: frames of near-pure noise hardly compress, and this halves the file.
    """
    frames = [frame.point(lambda v: round(v * 15 / 255) * 17) for frame in frames]
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=durations, loop=0, optimize=True))
