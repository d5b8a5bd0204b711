"""An independent MNIST classifier, to check that generated digits are the ones asked for (``lib.metrics``).

The bundled one (:data:`BUNDLED`) is used as it is; any other is trained on first use and kept in a cache file
with a fingerprint of its training files, and trained again when they change; a file there that is not such a
cache is never replaced. The files are safetensors (``lib.weights_io``), the weights in float16.
"""

import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tqdm import tqdm

from lib import weights_io
from lib.errors import UsageError
from lib.data import DATASETS, load_dataset
from lib.fileio import ensure_writable_dir

FORMAT = "conditional-ddpm-mnist classifier"
BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained",
                       "mnist_classifier.safetensors")


class Classifier(nn.Module):
    """A small CNN: ``uint8 (B, 28, 28)`` -> logits ``(B, 10)``; :meth:`features` gives ``(B, 128)``."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 32), block(32, 64), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, n_classes))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        # MNIST's own mean and std of pixel values in [0, 1]
        return (images.unsqueeze(1).float() / 255.0 - 0.1307) / 0.3081

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def feature_blocks(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features at three depths, for ``lib.metrics``: ``low`` and ``mid`` after each block, every channel's
        mean and standard deviation (``(B, 64)``, ``(B, 128)``), and ``high``, the penultimate ``(B, 128)``."""
        low = self.body[0](self.prepare(images))
        mid = self.body[1](low)
        return {"low": channel_stats(low), "mid": channel_stats(mid), "high": self.body[2:](mid)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def channel_stats(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 2C)``: each channel's mean and standard deviation over the image."""
    return torch.cat((maps.mean((2, 3)), maps.std((2, 3))), dim=1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and rotations of up to 10 degrees: ``(B, 28, 28)`` uint8 -> same."""
    batch = x.shape[0]
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(10)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (2 / 14)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack((torch.stack((cos, -sin, shift[:, 0]), 1), torch.stack((sin, cos, shift[:, 1]), 1)), 1)
    grid = F.affine_grid(theta, (batch, 1, 28, 28), align_corners=False)
    moved = F.grid_sample(x.unsqueeze(1).float(), grid.to(x.device), align_corners=False)
    return moved.squeeze(1).round().clamp(0, 255).to(torch.uint8)


@torch.inference_mode()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels ``(N,)`` for ``uint8 (N, 28, 28)`` images."""
    model.eval()
    return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 12, seed: int = 0,
                     progress: bool = False) -> Classifier:
    """Adam with a one-cycle learning rate over ``epochs`` passes, with augmentation; ``progress``: a bar."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Classifier()
    steps = epochs * -(-len(images) // 128)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc="classifier", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            for index in torch.randperm(len(images), generator=generator).split(128):
                loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
    return model.eval()


def fingerprint(root: str, dataset: str = "mnist") -> str:
    """Names, sizes and modification times of the training files: changes when the data changes."""
    raw = os.path.join(root, DATASETS[dataset].folder, "raw")
    entries = sorted(f for f in os.listdir(raw) if f.startswith("train")) if os.path.isdir(raw) else []
    return ";".join(f"{f}:{os.path.getsize(os.path.join(raw, f))}:{int(os.path.getmtime(os.path.join(raw, f)))}"
                    for f in entries)


def default_cache(dataset: str = "mnist") -> str:
    return os.path.join("checkpoints", "classifier", f"classifier_{dataset}.safetensors")


def default_classifier(dataset: str = "mnist") -> str:
    """The bundled classifier for MNIST (when this copy of the project has it), else the default cache."""
    return BUNDLED if dataset == "mnist" and os.path.isfile(BUNDLED) else default_cache(dataset)


def is_bundled(path: str) -> bool:
    return os.path.isfile(BUNDLED) and os.path.exists(path) and os.path.samefile(path, BUNDLED)


def half_precision(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state with its floating-point tensors rounded to float16."""
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def save_classifier(path: str, model: Classifier, info: dict[str, Any]) -> None:
    """``model``'s weights in float16 and ``info`` (numbers and strings) as a checked safetensors file."""
    weights_io.write(path, half_precision(model), {"format": FORMAT, **{k: json.dumps(v) for k, v in info.items()}})


def read_classifier(path: str) -> tuple[Classifier, dict[str, Any]]:
    """A classifier file and what it says of itself; a one-line :class:`UsageError` for anything else."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        if not weights_io.looks_like_safetensors(blob):
            raise weights_io.DamagedFile("it is not a safetensors file")
        meta = weights_io.read_header(blob)
        if meta.get("format") != FORMAT:
            raise weights_io.DamagedFile("it is not a classifier file of this project")
        info = {k: json.loads(v) for k, v in meta.items() if k != "format"}
        model = Classifier()
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in weights_io.read_tensors(blob).items()})
    except (weights_io.DamagedFile, json.JSONDecodeError, RuntimeError) as err:
        raise UsageError(f"{path!r} is not a classifier this project can use ({str(err).splitlines()[0][:200]}); "
                         "it was left as it is: choose another --classifier-cache") from None
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise UsageError(f"{path!r} holds NaN or infinite weights; it was left as it is: choose another file")
    return model.eval(), info


def load_or_train(root: str, cache: str, epochs: int = 12, dataset: str = "mnist") -> tuple[Classifier, dict[str, Any]]:
    """The classifier in ``cache``: the bundled one, or a cache of these files, as they are; else one trained
    (again) on ``root``'s training split and written there."""
    if os.path.exists(cache):
        model, saved = read_classifier(cache)
        if is_bundled(cache) or (saved.get("dataset"), saved.get("fingerprint"), saved.get("epochs")) == (
                dataset, fingerprint(root, dataset), epochs):
            return model, saved
        why = ("its training files have changed" if saved.get("dataset") == dataset
               else f"it is for {saved.get('dataset')}")
        print(f"note: the classifier in {cache!r} is out of date ({why}); training it again", file=sys.stderr)
    images, labels = load_dataset(root, train=True, download=False, name=dataset)
    test_images, test_labels = load_dataset(root, train=False, download=False, name=dataset)
    ensure_writable_dir(os.path.dirname(os.path.abspath(cache)), "cache folder")
    print(f"training a {dataset} classifier on the {len(images):,} training images of {root!r} (minutes on a CPU; "
          f"once: it is kept in {cache!r})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model = train_classifier(images, labels, epochs, progress=True)
    model.load_state_dict(half_precision(model))  # what the file keeps, so the accuracy is the file's
    saved = {"dataset": dataset, "fingerprint": fingerprint(root, dataset), "epochs": epochs,
             "test_accuracy": (predict(model, test_images) == test_labels).float().mean().item(),
             "train_size": len(images), "test_size": len(test_images),
             "train_seconds": round(time.perf_counter() - started, 1)}
    save_classifier(cache, model, saved)
    return model, saved
