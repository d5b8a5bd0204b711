"""Data in and images out: the two places where pixels change range.

* In: :func:`load_dataset` reads a data set of :data:`DATASETS` through torchvision as a ``uint8``
  tensor, :func:`batches` walks it in a seeded order, and :func:`to_model_range` maps a batch to
  floats in ``[-1, 1]``, the range of ``ddpm.py``.
* Out: :func:`to_uint8` maps model output back to ``uint8`` (white digit on black, like
  MNIST), and :func:`save_grid` writes a PNG grid with dark digits on white.

Images are ``(N, H, W)`` for one channel (MNIST's own layout) and ``(N, C, H, W)`` for more.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from config import UsageError
from fileio import atomic_write, write_bytes


@dataclass(frozen=True)
class DatasetInfo:
    """A data set torchvision reads: its class, its folder under the data root, and the shape of its images."""

    torchvision_class: type
    folder: str
    class_names: tuple[str, ...]
    image_size: int = 28
    channels: int = 1

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


DATASETS = {
    "mnist": DatasetInfo(torchvision.datasets.MNIST, "MNIST", tuple(str(k) for k in range(10))),
    "fashion-mnist": DatasetInfo(torchvision.datasets.FashionMNIST, "FashionMNIST", (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
}
RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
REPLACE = "replace the file with a good copy, or delete it to download it again"


def load_dataset(
    root: str, train: bool = True, download: bool = True, name: str = "mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a split with torchvision: ``images (N, H, W) uint8``, ``labels (N,) int64``.

    Nothing is downloaded when the files (or their ``.gz``, which are unpacked in place) are
    already in ``<root>/<folder>/raw``; when they are missing and cannot be downloaded, a
    :class:`UsageError` says where to put them, and a damaged file is one naming it.
    """
    cls, folder = DATASETS[name].torchvision_class, DATASETS[name].folder
    raw = os.path.join(root, folder, "raw")
    _unpack_local_gz(raw)
    check_raw_files(raw, train, DATASETS[name])
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


def first_images(images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and labels of a split, in the file's order (all of them for ``n = 0``)."""
    return (images[:n], labels[:n]) if n else (images, labels)


def _unpack_local_gz(raw: str) -> None:
    # torchvision reads only unpacked files unless it may download; unpacking is local work
    for name in RAW_FILES:
        packed, unpacked = os.path.join(raw, name + ".gz"), os.path.join(raw, name)
        if os.path.isfile(packed) and not os.path.exists(unpacked):
            try:
                atomic_write(unpacked, lambda tmp: _gunzip(packed, tmp))
            except Exception as err:
                raise UsageError(f"cannot unpack {packed!r} ({err}); replace it if it is damaged, or unpack it "
                                 f"yourself if {raw!r} is not writable") from None


def check_raw_files(raw: str, train: bool, info: DatasetInfo) -> None:
    """Refuse a split's damaged IDX files (truncated, misnamed, mislabelled) with one line naming the file.

    Missing files are left to torchvision's own check and the download.
    """
    split = "train" if train else "t10k"
    images_path = os.path.join(raw, f"{split}-images-idx3-ubyte")
    labels_path = os.path.join(raw, f"{split}-labels-idx1-ubyte")
    if not (os.path.isfile(images_path) and os.path.isfile(labels_path)):
        return
    images, labels = idx_shape(images_path, 3), idx_shape(labels_path, 1)
    if images[1:] != (info.image_size, info.image_size):
        raise UsageError(f"{images_path!r} holds {images[1]}x{images[2]} images, {info.folder} has "
                         f"{info.image_size}x{info.image_size}; {REPLACE}")
    if images[0] != labels[0]:
        raise UsageError(f"{labels_path!r} holds {labels[0]} labels for the {images[0]} images of "
                         f"{images_path!r}; {REPLACE}")
    with open(labels_path, "rb") as f:
        top = max(f.read()[4 + 4 * 1:], default=0)  # after the header of a 1-dimensional file
    if top >= info.n_classes:
        raise UsageError(f"{labels_path!r} holds label {top}, {info.folder} has {info.n_classes} classes; {REPLACE}")


def idx_shape(path: str, ndim: int) -> tuple[int, ...]:
    """The sizes in the header of an IDX file of unsigned bytes with ``ndim`` dimensions, checked against its length."""
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim or head[:3] != b"\0\0\x08" or head[3] != ndim:
        raise UsageError(f"{path!r} is not an IDX file of {ndim}-dimensional bytes (damaged or misnamed); {REPLACE}")
    dims = struct.unpack(f">{ndim}I", head[4:])
    promised, size = len(head) + math.prod(dims), os.path.getsize(path)
    if size != promised:
        raise UsageError(f"{path!r} is {'truncated' if size < promised else 'too long'}: {size} bytes where its "
                         f"header promises {promised}; {REPLACE}")
    return dims


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
    atomic_write(path, lambda tmp: write_bytes(tmp, header + array.to(torch.uint8).contiguous().numpy().tobytes()))


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
            on_device: bool = True, device: torch.device | None = None,
            part: Callable[[torch.Tensor], torch.Tensor] | None = None,
            skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(uint8 images, int64 labels)`` in a seeded random order, from batch ``skip`` on.

    ``on_device``: index the tensors where they are; otherwise a ``DataLoader`` collates each batch on the CPU
    and it is copied to ``device``. ``part`` keeps this process's slice of each batch's indices (all of
    them in a single process; see ``distributed.Replicas``).
    """
    order = torch.randperm(len(images), generator=generator)
    indices = [order[start:start + batch_size] for start in range(0, len(images), batch_size)][skip:]
    indices = [part(index) for index in indices] if part else indices
    if on_device:
        for index in indices:
            index = index.to(images.device)
            yield images[index], labels[index]
        return
    dataset = torch.utils.data.TensorDataset(images.cpu(), labels.cpu())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[index.tolist() for index in indices])
    for x, y in loader:
        yield x.to(device or images.device), y.to(device or images.device)


def to_model_range(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``uint8 (B, H, W)`` or ``(B, C, H, W)`` in ``[0, 255]`` -> ``float (B, C, H, W)`` in ``[-1, 1]``."""
    x = (images.unsqueeze(1) if images.ndim == 3 else images).float().div(127.5).sub(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model output ``(B, C, H, W)`` around ``[-1, 1]`` -> ``uint8``, white digit on black.

    One channel comes back as ``(B, H, W)``, MNIST's own layout; more stay ``(B, C, H, W)``.
    """
    pixels = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return pixels.squeeze(1) if pixels.shape[1] == 1 else pixels


def grid_image(x: torch.Tensor, ncol: int = 10, header: list[str] | None = None) -> Image.Image:
    """Images ``(B, C, H, W)`` in ``[-1, 1]`` as one picture, ``ncol`` per row, dark on white.

    With ``header`` (one name per column) the grid is drawn at twice the size under a row of names.
    """
    inverted = 255 - to_uint8(x)
    inverted = inverted.unsqueeze(1) if inverted.ndim == 3 else inverted
    grid = make_grid(inverted, nrow=ncol, padding=2, pad_value=255)
    image = Image.fromarray(grid[0].numpy()) if x.shape[1] == 1 else Image.fromarray(grid.permute(1, 2, 0).numpy())
    if header is None:
        return image
    image = image.resize((image.width * 2, image.height * 2), Image.NEAREST)
    framed = Image.new(image.mode, (image.width, image.height + 16), "white")
    framed.paste(image, (0, 16))
    draw, font, column = ImageDraw.Draw(framed), ImageFont.load_default(), image.width / ncol
    for k, name in enumerate(header):
        draw.text(((k + 0.5) * column, 8), name, fill=0, font=font, anchor="mm")
    return framed


def save_grid(x: torch.Tensor, path: str, ncol: int = 10, header: list[str] | None = None) -> None:
    """Write :func:`grid_image` of ``x (B, C, H, W)`` as a PNG (atomically)."""
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
