"""Data in and images out, the two places where pixels change range: :func:`load_dataset` reads a data set of
:data:`DATASETS` through torchvision as ``uint8``, :func:`batches` walks it in a seeded order and
:func:`to_model_range` maps a batch to ``[-1, 1]``; :func:`to_uint8` maps model output back, and
:func:`save_grid` writes a PNG grid, dark digits on white. Images are ``(N, H, W)`` for one channel (MNIST's own
layout) and ``(N, C, H, W)`` for more.
"""

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

from lib.errors import UsageError
from lib.fileio import atomic_write


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
    """A split through torchvision, ``images (N, H, W) uint8`` and ``labels (N,)``, downloaded only if its files
    (or their ``.gz``) are not in ``<root>/<folder>/raw``; a missing or damaged file is a one-line ``UsageError``."""
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
    """Refuse a split's damaged IDX files (truncated, misnamed, mislabelled) in one line naming the file."""
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


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
            part: Callable[[torch.Tensor], torch.Tensor] | None = None,
            skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(uint8 images, labels)`` in a seeded order from batch ``skip`` on; ``part``: this rank's slice."""
    order = torch.randperm(len(images), generator=generator)
    for start in range(skip * batch_size, len(images), batch_size):
        index = order[start:start + batch_size]
        index = (part(index) if part else index).to(images.device)
        yield images[index], labels[index]


def to_model_range(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``uint8 (B, H, W)`` or ``(B, C, H, W)`` in ``[0, 255]`` -> ``float (B, C, H, W)`` in ``[-1, 1]``."""
    x = (images.unsqueeze(1) if images.ndim == 3 else images).float().div(127.5).sub(1.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model output ``(B, C, H, W)`` around ``[-1, 1]`` -> ``uint8``, white on black: ``(B, H, W)`` for one channel."""
    pixels = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return pixels.squeeze(1) if pixels.shape[1] == 1 else pixels


def grid_image(x: torch.Tensor, ncol: int = 10, header: list[str] | None = None) -> Image.Image:
    """Images ``(B, C, H, W)`` in ``[-1, 1]`` as one picture, ``ncol`` per row, dark on white; with ``header`` (a
    name per column) at twice the size under a row of names."""
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
    """Write ``frames`` as a looping GIF in 16 grey levels (noise compresses badly), the last held ``hold_ms``."""
    frames = [frame.point(lambda v: round(v * 15 / 255) * 17) for frame in frames]
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=durations, loop=0, optimize=True))
