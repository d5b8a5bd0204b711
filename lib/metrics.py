"""Sample quality in the features of the project's classifier (``lib.classifier``): accuracy (read as the class
asked for); FID (Heusel et al. 2017) in features taken at the classifier's two convolutional blocks, which see
strokes and backgrounds, and at its penultimate layer, which sees the class, each scaled to unit variance on the
test digits; precision and recall (Kynkäänniemi et al. 2019), the shares of generated digits inside the manifold
of real ones and of real digits inside theirs. :class:`Reference` scores labelled images and gives the floor: the
same metrics for as many real training digits of the same classes.
"""

from typing import Any

import torch

from lib import classifier as clf


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of ``features (N, D)``, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` (Heusel et al. 2017), the trace of the square root from the
    eigenvalues of the symmetric ``C1^(1/2) C2 C1^(1/2)``, which has the same spectrum."""
    values, vectors = torch.linalg.eigh(cov1.double())
    sqrt_c1 = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = sqrt_c1 @ cov2.double() @ sqrt_c1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).double().pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt
    return float(distance.clamp(min=0))


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1000) -> torch.Tensor:
    """Distance from each of ``features (N, D)`` to its ``k``-th nearest other point: ``(N,)``."""
    return torch.cat([torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(chunk)])


def coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 1000) -> float:
    """The share of ``points`` inside at least one ball ``|x - manifold[j]| <= radii[j]``."""
    inside = [(torch.cdist(part, manifold) <= radii[None]).any(1) for part in points.split(chunk)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real`` features."""
    real, fake = real.float(), fake.float()
    return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


class FeatureSpace:
    """The metric's features: the classifier's blocks, each scaled to unit total variance on ``reference``."""

    def __init__(self, model: clf.Classifier, reference: torch.Tensor) -> None:
        self.model = model
        blocks = self.blocks(reference)
        self.scales = {name: float(block.double().var(0).sum().rsqrt()) for name, block in blocks.items()}

    @torch.inference_mode()
    def blocks(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.model.eval()
        parts = [self.model.feature_blocks(chunk) for chunk in images.split(1000)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` (the scaled blocks, concatenated) and ``predicted`` labels."""
        blocks = self.blocks(images)
        features = torch.cat([blocks[name] * scale for name, scale in self.scales.items()], dim=1)
        return {"features": features, "predicted": self.model.head(blocks["high"]).argmax(1)}


def class_matched(labels: torch.Tensor, pool: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices into ``pool`` with as many of each class as ``labels``, drawn without replacement."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for k, count in zip(*labels.unique(return_counts=True)):
        index = (pool == k).nonzero().flatten()
        picks.append(index[torch.randperm(len(index), generator=generator)[:count]])
    return torch.cat(picks)


class Reference:
    """Real digits to score against: the test split (FID, precision, recall) and the training split (the floor)."""

    def __init__(self, model: clf.Classifier, train: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], seed: int = 0, name: str = "real training digits") -> None:
        self.space, self.seed, self.name = FeatureSpace(model, test[0]), seed, name
        self.train, self.test_labels = train, test[1]
        self._draws: dict[tuple, dict[str, torch.Tensor]] = {}  # real draws by class counts: embedded once
        self.test = self.space.embed(test[0])
        self.stats = gaussian_stats(self.test["features"])

    def _real_draw(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The class-matched draw of real training digits, embedded (every row of a table shares it)."""
        key = tuple(map(tuple, torch.stack(labels.unique(return_counts=True)).tolist()))
        if key not in self._draws:
            index = class_matched(labels, self.train[1], self.seed)
            self._draws[key] = {**self.space.embed(self.train[0][index]), "labels": self.train[1][index]}
        return self._draws[key]

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Every metric of labelled ``images``: accuracy (and per class), FID, precision and recall."""
        return self._score(self.space.embed(images), labels)

    def floor(self, labels: torch.Tensor) -> dict[str, Any]:
        """The same metrics for real training digits of the classes in ``labels``: the floor at that size."""
        real = self._real_draw(labels)
        return {"name": self.name, **self._score(real, real["labels"])}

    def _score(self, e: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
        correct = e["predicted"] == labels
        test_draw = self.test["features"][class_matched(labels, self.test_labels, self.seed + 1)]
        precision, recall = precision_recall(test_draw, e["features"])
        return {
            "n": len(labels),
            "accuracy": correct.float().mean().item(),
            "per_digit": {int(k): correct[labels == k].float().mean().item() for k in labels.unique()},
            "fid": frechet_distance(*gaussian_stats(e["features"]), *self.stats),
            "precision": precision, "recall": recall,
        }
