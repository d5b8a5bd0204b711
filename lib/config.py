"""Every setting of a run, typed and checked in one place, and stored in the checkpoint as a plain dict: the
network (:class:`ModelConfig`), the schedule (:class:`DiffusionConfig`) and the run (:class:`TrainConfig`).
``train.py`` makes a flag of each setting marked ``flag`` (``n_feat`` is ``--n-feat``); the presets set the rest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

from ddpm import PREDICTIONS
from lib.errors import UsageError
from lib.optimizers import OPTIMIZERS


def choice(values: tuple[str, ...]) -> tuple[Callable[[str], Any], Callable[[Any], bool], str]:
    """A rule for a setting that takes one of ``values``."""
    return str, lambda v: v in values, f"one of {', '.join(values)}"


# rule name -> (parse a command-line string, the test a value must pass, what the test asks for)
RULES: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "positive_int": (int, lambda v: v >= 1, "a positive integer"),
    "non_negative_int": (int, lambda v: v >= 0, "an integer >= 0"),
    "positive_float": (float, lambda v: 0 < v < math.inf, "a positive number"),
    "non_negative_float": (float, lambda v: 0 <= v < math.inf, "a number >= 0"),
    "int": (int, lambda v: True, "an integer"),
    "switch": (int, lambda v: v in (0, 1), "0 or 1"),
    "prediction": choice(PREDICTIONS),
    "optimizer": choice(OPTIMIZERS),
}


def setting(default: Any, rule: str, help: str, flag: bool = True, most: float | None = None) -> Any:
    """A setting: its default, rule (:data:`RULES`), help, whether ``train.py`` has a flag for it, and ``most``,
    the largest value allowed, so that a file's config cannot ask for more than a model of this kind needs."""
    return field(default=default, metadata={"rule": rule, "help": help, "flag": flag, "most": most})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``unet.ContextUnet(in_channels, n_feat, n_classes, image_size, cond_encoder)``."""

    n_feat: int = setting(128, "positive_int", "UNet width, a multiple of 8; the bottleneck has 2 * n_feat channels",
                          most=512)
    image_size: int = setting(28, "positive_int", "image height and width (from the data set)", False, 256)
    in_channels: int = setting(1, "positive_int", "image channels (from the data set)", False, 4)
    n_classes: int = setting(10, "positive_int", "number of classes (from the data set)", False, 1000)
    cond_encoder: int = setting(0, "switch", "1: time and label also modulate the encoder", False)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process (``T`` steps of a linear beta schedule) and what the network predicts (``ddpm.DDPM``)."""

    T: int = setting(500, "positive_int", "diffusion steps", most=10_000)
    beta_start: float = setting(1e-4, "positive_float", "first beta of the linear schedule", False)
    beta_end: float = setting(0.02, "positive_float", "last beta of the linear schedule", False)
    prediction: str = setting("eps", "prediction", "what the network predicts: eps (the noise) or v (Salimans & Ho)")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation, and the per-epoch progress grids."""

    epochs: int = setting(20, "positive_int", "epochs", most=100_000)
    train_images: int = setting(0, "non_negative_int", "the first N images of the training split (0: all)", False)
    batch_size: int = setting(256, "positive_int", "batch size", most=65_536)
    lr: float = setting(1e-4, "positive_float", "learning rate, lowered linearly to 0 over the epochs")
    optimizer: str = setting("adam", "optimizer", "adam, or muon for the hidden weight matrices (lib/optimizers.py)")
    p_uncond: float = setting(0.1, "non_negative_float", "probability of dropping a label (for the guidance)")
    seed: int = setting(0, "int", "random seed (weights, data order, noise)")
    grid_rows: int = setting(4, "positive_int", "rows of classes 0..9 in each per-epoch grid", False, 100)


PARTS = {"model": ModelConfig, "diffusion": DiffusionConfig, "training": TrainConfig}

# Settings of earlier versions that lost their comparisons (docs/results.md#what-was-tried): the value that is
# the same as not having them, and whether a network trained with another value samples differently.
REMOVED: dict[str, tuple[Any, bool]] = {
    "schedule": ("linear", True), "ada_norm": (0, True), "mid_blocks": (0, True), "self_cond": (0, True),
    "loss_weight": ("uniform", False), "t_sampling": ("uniform", False), "noise_pairing": ("random", False),
    "lr_schedule": ("epoch-linear", False), "adam_beta2": (0.999, False), "grad_clip": (0.0, False),
    "muon_lr_mult": (2.0, False), "ema_decay": (0.995, False), "ema_gamma": (8.0, False),
}


def settings() -> dict[str, tuple[str, Any]]:
    """Every setting by name: ``name -> (part, dataclass field)``."""
    return {f.name: (part, f) for part, cls in PARTS.items() for f in fields(cls)}


def flat_dict(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config as one flat dict: :meth:`Config.to_dict`'s nested form, or version 1's flat one."""
    if all(isinstance(stored.get(part), dict) for part in PARTS):
        flat = {k: v for part in PARTS for k, v in stored[part].items()}
        return {**flat, **{k: stored[k] for k in ("dataset", "preset") if k in stored}}
    return dict(stored)


def removed_settings(stored: dict[str, Any], sampling: bool) -> list[str]:
    """The settings of an earlier version a stored config uses (``--self-cond 1``): with ``sampling``, those that
    change how its network samples; else all."""
    flat = flat_dict(stored)
    used = [f"{flag_name(k)} {flat[k]}" for k, (neutral, samples) in REMOVED.items()
            if k in flat and flat[k] != neutral and (samples or not sampling)]
    return used + (["--prediction x0"] if flat.get("prediction") == "x0" else [])


@dataclass(frozen=True)
class Config:
    """One run: ``model``, ``diffusion`` and ``training``, the data set's name and the preset it started from."""

    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    training: TrainConfig = TrainConfig()
    dataset: str = "mnist"
    preset: str = "default"

    def flat(self) -> dict[str, Any]:
        """Every setting by name (``{"T": 500, "n_feat": 128, ...}``)."""
        return {name: getattr(getattr(self, part), name) for name, (part, _) in settings().items()}

    def override(self, **values: Any) -> Config:
        """This config with the named settings (or ``dataset``/``preset``) replaced; unknown names are an error."""
        known = settings()
        unknown = set(values) - set(known) - {"dataset", "preset"}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        parts = {part: replace(getattr(self, part), **{k: v for k, v in values.items() if k in known
                                                       and known[k][0] == part}) for part in PARTS}
        return replace(self, **parts, **{k: v for k, v in values.items() if k in ("dataset", "preset")})

    def validate(self) -> Config:
        """``self`` if every setting obeys its rule, its bound and the others; else a one-line :class:`UsageError`."""
        known = settings()
        for name, value in self.flat().items():
            meta = known[name][1].metadata
            parse, ok, wanted = RULES[meta["rule"]]
            kind = str if parse is str else (int, float)
            if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
                raise UsageError(f"{flag_name(name)} must be {wanted}, got {value!r}")
            if meta["most"] is not None and value > meta["most"]:
                raise UsageError(f"{flag_name(name)} must be at most {meta['most']:,}, got {value:,}")
        m, d, t = self.model, self.diffusion, self.training
        for ok, message in (
            (m.n_feat % 8 == 0, f"--n-feat must be a multiple of 8 (GroupNorm uses 8 groups), got {m.n_feat}"),
            (m.image_size % 4 == 0, f"image size must be a multiple of 4 (two 2x poolings), got {m.image_size}"),
            (d.beta_start <= d.beta_end < 1, f"need beta_start <= beta_end < 1, got {d.beta_start}, {d.beta_end}"),
            (t.p_uncond < 1, f"--p-uncond must be below 1, got {t.p_uncond}"),
        ):
            if not ok:
                raise UsageError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict of numbers and strings: what the checkpoint stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Config:
        """Read :meth:`to_dict`'s form or version 1's flat dict, leaving out settings this version does not have."""
        known = set(settings()) | {"dataset", "preset"}
        return cls().override(**{k: v for k, v in flat_dict(stored).items() if k in known})


# The original README's run, and the small model for a 2-core CPU with the recipe its ablation chose (docs/results.md):
# the first 10,000 training images, 8 epochs of 157 steps at batch 64.
PRESETS: dict[str, Config] = {
    "default": Config(),
    "cpu": Config(preset="cpu").override(
        n_feat=32, cond_encoder=1, beta_start=2e-4, beta_end=0.02, prediction="v", epochs=8, train_images=10_000,
        batch_size=64, lr=1e-3, optimizer="muon", p_uncond=0.3, grid_rows=1),
}
