"""Every setting of a run, typed, checked in one place, and stored in the checkpoint as a plain dict.

A :class:`Config` has three parts: the network (:class:`ModelConfig`), the noise schedule
(:class:`DiffusionConfig`) and the training run (:class:`TrainConfig`). Each setting is a dataclass
field whose metadata gives its command-line help and the rule it must obey, so that ``train.py``
builds its flags from these fields and a new setting is one field here plus the code that uses it.
A setting ``n_feat`` is the flag ``--n-feat``; setting names are unique across the parts.

:class:`UsageError` is the project's one kind of bad-input error: scripts print it as one line and
exit with status 2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

from ddpm import BETA_SCHEDULES, LOSS_WEIGHTS, NOISE_PAIRINGS, PREDICTIONS, T_SAMPLINGS
from optimizers import OPTIMIZERS


class UsageError(Exception):
    """Bad input. Reported as one line on stderr with exit status 2, never as a traceback."""


def choice(values: tuple[str, ...]) -> tuple[Callable[[str], Any], Callable[[Any], bool], str]:
    """A rule for a setting that takes one of ``values``."""
    return str, lambda v: v in values, f"one of {', '.join(values)}"


# rule name -> (parse a command-line string, the test a value must pass, what the test asks for)
RULES: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "positive_int": (int, lambda v: v >= 1, "a positive integer"),
    "non_negative_int": (int, lambda v: v >= 0, "an integer >= 0"),
    "positive_float": (float, lambda v: 0 < v < math.inf, "a positive number"),
    "non_negative_float": (float, lambda v: 0 <= v < math.inf, "a number >= 0"),
    "at_least_one_float": (float, lambda v: 1 <= v < math.inf, "a number >= 1"),
    "int": (int, lambda v: True, "an integer"),
    "switch": (int, lambda v: v in (0, 1), "0 or 1"),
    "prediction": choice(PREDICTIONS),
    "schedule": choice(BETA_SCHEDULES),
    "loss_weight": choice(LOSS_WEIGHTS),
    "t_sampling": choice(T_SAMPLINGS),
    "noise_pairing": choice(NOISE_PAIRINGS),
    "float": (float, lambda v: math.isfinite(v), "a number"),
    "lr_schedule": choice(("epoch-linear", "cosine")),
    "optimizer": choice(OPTIMIZERS),
}


def setting(default: Any, rule: str, help: str, flag: bool = True, most: float | None = None) -> Any:
    """A dataclass field that is a setting: its default, its rule (:data:`RULES`) and its help text.

    ``flag=False`` marks a setting that comes from the data set rather than the command line. ``most`` is the
    largest value allowed: a bound that keeps a file's config from asking for more memory or time than a model
    of this kind could need.
    """
    return field(default=default, metadata={"rule": rule, "help": help, "flag": flag, "most": most})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``unet.ContextUnet(in_channels, n_feat, n_classes, image_size)``."""

    n_feat: int = setting(128, "positive_int", "UNet width, a multiple of 8; the bottleneck has 2 * n_feat channels",
                          most=512)
    image_size: int = setting(28, "positive_int", "image height and width (from the data set)", flag=False, most=256)
    in_channels: int = setting(1, "positive_int", "image channels (from the data set)", flag=False, most=4)
    n_classes: int = setting(10, "positive_int", "number of classes (from the data set)", flag=False, most=1000)
    cond_encoder: int = setting(0, "switch", "1: time and label also modulate the encoder blocks, not only the "
                                "decoder (unet.ContextUnet)")
    ada_norm: int = setting(0, "switch", "1: time and label also scale and shift the second group norm of every "
                            "residual block (AdaGN, Dhariwal & Nichol 2021)")
    mid_blocks: int = setting(0, "non_negative_int", "residual blocks at the 7x7 bottleneck (2 * n_feat channels), "
                              "each conditioned on time and label like the encoder's", most=16)
    self_cond: int = setting(0, "switch", "1: the network also reads its own estimate of the clean image from the "
                             "step before (self-conditioning, Chen et al. 2022)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process (``T`` steps of a beta schedule) and what the network predicts (``ddpm.DDPM``)."""

    T: int = setting(500, "positive_int", "diffusion steps", most=10_000)
    beta_start: float = setting(1e-4, "positive_float", "first beta of the linear schedule")
    beta_end: float = setting(0.02, "positive_float", "last beta of the linear schedule")
    schedule: str = setting("linear", "schedule", "beta schedule: linear (Ho et al.) or cosine (Nichol & "
                            "Dhariwal; ignores the betas above)")
    prediction: str = setting("eps", "prediction", "what the network predicts: eps (the noise), v "
                              "(Salimans & Ho) or x0 (the clean image)")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation, and the per-epoch progress grids it draws."""

    epochs: int = setting(20, "positive_int", "epochs", most=100_000)
    train_images: int = setting(0, "non_negative_int", "train on the first N images of the training split, as "
                                "stored in its file (0 = all of them)")
    batch_size: int = setting(256, "positive_int", "batch size", most=65_536)
    lr: float = setting(1e-4, "positive_float", "peak learning rate")
    optimizer: str = setting("adam", "optimizer", "adam, or muon: Muon's orthogonalised momentum steps for the "
                             "hidden weight matrices (Jordan et al. 2024), Adam for the rest (optimizers.py)")
    muon_lr_mult: float = setting(2.0, "positive_float", "--optimizer muon: Muon's learning rate as a multiple "
                                  "of --lr (its steps are scaled to Adam's size, Liu et al. 2025)")
    lr_schedule: str = setting("epoch-linear", "lr_schedule", "epoch-linear: lr * (1 - epoch / epochs) per epoch; "
                               "cosine: linear warm-up over --warmup steps, then cosine to 0, per step")
    warmup: int = setting(0, "non_negative_int", "warm-up steps of the cosine learning-rate schedule")
    adam_beta2: float = setting(0.999, "positive_float", "Adam's beta2, the decay of its squared-gradient average "
                                "(0.99 forgets early gradients 10 times sooner)")
    grad_clip: float = setting(0.0, "non_negative_float", "scale each gradient down to this global norm where it "
                               "is longer (0 = never)")
    loss_weight: str = setting("uniform", "loss_weight", "uniform (Ho et al.), min-snr: each timestep's loss "
                               "weighted as Min-SNR-gamma (Hang et al. 2023), or truncated-snr: as max(SNR, "
                               "floor) (Salimans & Ho 2022)")
    snr_gamma: float = setting(5.0, "positive_float", "gamma of --loss-weight min-snr")
    snr_floor: float = setting(1.0, "positive_float", "floor of --loss-weight truncated-snr")
    t_sampling: str = setting("uniform", "t_sampling", "how training draws timesteps: uniform (Ho et al.), "
                              "log-normal: log sigma ~ N(mean, std^2), the noise levels of EDM (Karras et al. 2022), "
                              "or stratified: uniform, one draw in each 1/batch of the steps (Kingma et al. 2021)")
    log_sigma_mean: float = setting(-1.2, "float", "mean of log sigma under --t-sampling log-normal")
    log_sigma_std: float = setting(1.2, "positive_float", "standard deviation of log sigma under --t-sampling "
                                   "log-normal")
    noise_pairing: str = setting("random", "noise_pairing", "which noise each training image is diffused with: "
                                 "random (Ho et al.), assign: the batch's draws, each given to a near image, or "
                                 "knn: the nearest of --noise-candidates draws (immiscible diffusion, Li et al. "
                                 "2024, 2025)")
    noise_candidates: int = setting(64, "positive_int", "draws per image under --noise-pairing knn", most=4096)
    p_uncond: float = setting(0.1, "non_negative_float", "probability of dropping a label (classifier-free guidance)")
    ema_decay: float = setting(0.995, "non_negative_float", "EMA decay of the sampling weights")
    ema_gamma: float = setting(8.0, "non_negative_float", "the EMA's warm-up, a power-function EMA (Karras et al. "
                               "2024): step k's decay is min(--ema-decay, (1 + k) / (gamma + 2 + k)), so a larger "
                               "gamma averages a shorter stretch of the run")
    seed: int = setting(0, "int", "random seed (weights, data order, noise)")
    guidance: float = setting(2.0, "non_negative_float", "guidance scale of the per-epoch grids")
    grid_rows: int = setting(4, "positive_int", "rows of classes 0..9 in each per-epoch grid", most=100)
    grid_steps: int = setting(20, "non_negative_int",
                              "steps of the default sampler for the per-epoch grids; 0 = the full ancestral sampler")


PARTS = {"model": ModelConfig, "diffusion": DiffusionConfig, "training": TrainConfig}


def settings() -> dict[str, tuple[str, Any]]:
    """Every setting by name: ``name -> (part, dataclass field)``."""
    return {f.name: (part, f) for part, cls in PARTS.items() for f in fields(cls)}


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
        by_part: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for name, value in values.items():
            if name in known:
                by_part[known[name][0]][name] = value
        parts = {part: replace(getattr(self, part), **changes) for part, changes in by_part.items()}
        top = {k: v for k, v in values.items() if k in ("dataset", "preset")}
        return replace(self, **parts, **top)

    def validate(self) -> Config:
        """``self`` if every setting obeys its rule and the settings agree; else a one-line :class:`UsageError`."""
        known = settings()
        for name, value in self.flat().items():
            _, ok, wanted = RULES[known[name][1].metadata["rule"]]
            kind = str if RULES[known[name][1].metadata["rule"]][0] is str else (int, float)
            if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
                raise UsageError(f"{flag_name(name)} must be {wanted}, got {value!r}")
            most = known[name][1].metadata["most"]
            if most is not None and value > most:
                raise UsageError(f"{flag_name(name)} must be at most {most:,}, got {value:,}")
        m, d, t = self.model, self.diffusion, self.training
        checks = [
            (m.n_feat % 8 == 0, f"--n-feat must be a multiple of 8 (GroupNorm uses 8 groups), got {m.n_feat}"),
            (m.image_size % 4 == 0, f"image size must be a multiple of 4 (two 2x poolings), got {m.image_size}"),
            (d.beta_start <= d.beta_end < 1,
             f"need --beta-start <= --beta-end < 1, got {d.beta_start} and {d.beta_end}"),
            (t.p_uncond < 1, f"--p-uncond must be below 1, got {t.p_uncond}"),
            (t.ema_decay < 1, f"--ema-decay must be below 1, got {t.ema_decay}"),
            (t.adam_beta2 < 1, f"--adam-beta2 must be below 1, got {t.adam_beta2}"),
            (t.grid_steps <= d.T, f"--grid-steps must be at most T={d.T}, got {t.grid_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict of numbers and strings: what the checkpoint stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Config:
        """Read :meth:`to_dict`'s form, or the flat dict of version-1 checkpoints (``{"T": ..., "n_feat": ...}``)."""
        if all(isinstance(stored.get(part), dict) for part in PARTS):
            flat = {k: v for part in PARTS for k, v in stored[part].items()}
            flat.update({k: stored[k] for k in ("dataset", "preset") if k in stored})
        else:
            flat = dict(stored)
        known = set(settings()) | {"dataset", "preset"}
        return cls().override(**{k: v for k, v in flat.items() if k in known})


# The small model sized for a 2-core CPU with the 2020 recipe (noise prediction, Adam, 20 epochs); the ablation in
# docs/recipes.md is measured from it, on 10,000 MNIST digits: so the CPU presets train on the first 10,000 images
# (157 steps per epoch at batch 64) whether the data root holds those or all 60,000.
_CPU_2020 = Config().override(n_feat=32, beta_start=2e-4, beta_end=0.04, batch_size=64, lr=1e-3, grid_rows=1,
                              train_images=10_000)

# The ancestor's run; the same small model with the recipe chosen by that ablation, trained for 40% of its steps
# (docs/recipes.md#the-cpu-preset-from-here-on); and the earlier recipe, kept reachable.
PRESETS: dict[str, Config] = {
    "default": Config(),
    "cpu": _CPU_2020.override(prediction="v", cond_encoder=1, optimizer="muon", beta_end=0.02, p_uncond=0.3,
                              epochs=8, preset="cpu"),
    "cpu-2020": _CPU_2020.override(preset="cpu-2020"),
}
