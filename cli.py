"""Command-line plumbing shared by the scripts: argument types, the sampling flags, device choice, one-line errors."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable, Sequence

import torch

from checkpoint import load_weak_model
from config import RULES, UsageError
from ddpm import DDPM, DEFAULT_SAMPLER, SAMPLERS, eta_samplers, fewer_step_samplers, sampler_class
from generation import DEFAULT_GUIDANCE_INTERVAL, Sampling, describe_interval
from stopping import Interrupted, RunStopped


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are :class:`UsageError` (one line) instead of usage + exit.

    ``examples`` are printed at the end of ``--help``.
    """

    def __init__(self, *args: Any, examples: Sequence[str] = (), **kwargs: Any) -> None:
        if examples:
            kwargs.setdefault("epilog", "examples:\n" + "\n".join(f"  {line}" for line in examples))
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def run_cli(prog: str, body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run ``body(argv)``; a :class:`UsageError` becomes ``prog: error: ...`` and exit status 2.

    A run that stops early (``stopping``) prints its one line and exits with its own status: 1 for a
    failure, 130 or 143 for an interrupt that saved its work.
    """
    try:
        return body(argv)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(err, file=sys.stderr)
        return err.status
    except RunStopped as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def typed(rule: str) -> Callable[[str], Any]:
    """An argparse type for one of ``config.RULES``: the value, or an error saying what was expected."""
    convert, ok, wanted = RULES[rule]

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = typed("positive_int")
non_negative_int = typed("non_negative_int")
positive_float = typed("positive_float")
non_negative_float = typed("non_negative_float")
at_least_one_float = typed("at_least_one_float")


def pick_device(name: str | None) -> torch.device:
    """``None`` -> cuda, then mps, then cpu; otherwise check that the named device exists."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")
    return device


def sampler_help() -> str:
    """The ``--sampler`` help, from the registry: every sampler's summary and the default."""
    default = sampler_class(DEFAULT_SAMPLER)
    listed = "; ".join(f"{name}: {cls.summary}" for name, cls in SAMPLERS.items())
    return f"{listed} (default: {DEFAULT_SAMPLER}, {default.default_steps} steps, eta {default.default_eta:g})"


def add_sampling_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The flags that say how images are generated (``sample.py``, ``evaluate.py``); ``many``: lists of them."""
    nargs = "+" if many else None
    p.add_argument("--sampler", choices=list(SAMPLERS), nargs=nargs, help=sampler_help())
    p.add_argument("--steps", type=positive_int, nargs=nargs,
                   help=f"steps of {' or '.join(fewer_step_samplers())} (default: the sampler's own)")
    p.add_argument("--eta", type=non_negative_float,
                   help=f"noise of {' and '.join(eta_samplers())}: 0 deterministic, 1 the posterior's (default: "
                        + ", ".join(f"{n} {SAMPLERS[n].default_eta:g}" for n in eta_samplers()) + ")")
    p.add_argument("--guidance", type=non_negative_float, nargs=nargs, default=[2.0] if many else 2.0,
                   help="classifier-free guidance scale s: 0 unconditional, 1 conditional (default 2)")
    p.add_argument("--guidance-interval", type=sigma_bound, nargs=2, metavar=("LO", "HI"),
                   help="apply the guidance only at noise levels LO < sigma <= HI, plain conditional elsewhere "
                        "(sigma = sqrt((1 - a_bar) / a_bar); 0 inf: at every step; default: "
                        f"{describe_interval(DEFAULT_GUIDANCE_INTERVAL)})")
    p.add_argument("--autoguidance", type=at_least_one_float, nargs=nargs, default=[1.0] if many else 1.0,
                   metavar="A", help="autoguidance scale a (Karras et al. 2024): also steer away from --weak-model's "
                                     "estimate for the same label, inside the guidance interval (default 1: off)")
    p.add_argument("--weak-model", metavar="CKPT",
                   help="the weaker model --autoguidance steers away from: a checkpoint with the same noise "
                        "schedule, e.g. an earlier epoch of the same run (train.py --snapshot-epochs)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast: faster on GPUs and CPUs with bf16 units")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--batch-size", type=positive_int, default=100,
                   help="images generated at once (default 100); the noise is drawn one batch at a time, so a "
                        "seed gives the same images at the same batch size")


def sampling_from_args(args: argparse.Namespace, T: int) -> Sampling:
    """The :class:`Sampling` that single-valued sampling flags ask for, checked against ``T``.

    ``--steps`` alone keeps the default sampler.
    """
    return Sampling(args.sampler or DEFAULT_SAMPLER, args.steps, args.eta, args.guidance, args.amp,
                    interval_from_args(args), args.autoguidance).resolve(T)


def weak_model_from_args(args: argparse.Namespace, ddpm: DDPM) -> DDPM | None:
    """The ``--weak-model`` that ``--autoguidance`` needs, loaded beside ``ddpm``; ``None`` when it is off."""
    scales = args.autoguidance if isinstance(args.autoguidance, list) else [args.autoguidance]
    guided = any(a != 1.0 for a in scales)
    if guided and not args.weak_model:
        raise UsageError("--autoguidance A needs --weak-model CKPT, a weaker checkpoint with the same schedule "
                         "(e.g. an earlier epoch of the same run, kept by train.py --snapshot-epochs)")
    if args.weak_model and not guided:
        raise UsageError("--weak-model is used only by --autoguidance A with A > 1 (e.g. 2); add it or drop "
                         "--weak-model")
    return load_weak_model(args.weak_model, ddpm) if guided else None


def sigma_bound(text: str) -> float:
    """An argparse type: a noise level ``sigma >= 0`` (``inf`` allowed)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a noise level >= 0 (or inf), got {text!r}")
    return value


def interval_from_args(args: argparse.Namespace) -> tuple[float, float] | None:
    """``--guidance-interval`` as a ``(lo, hi)`` pair, ``None`` for every step, the default when not given."""
    if args.guidance_interval is None:
        return DEFAULT_GUIDANCE_INTERVAL
    lo, hi = args.guidance_interval
    if lo >= hi:
        raise UsageError(f"--guidance-interval needs LO < HI, got {lo:g} {hi:g}")
    return None if lo == 0 and hi == math.inf else (lo, hi)
