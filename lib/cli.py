"""The command-line layer shared by the scripts: argument types, the sampling flags, device choice, and
:func:`run_cli`, which turns the project's errors into one line and an exit status. No library module imports it."""

import argparse
import sys
from typing import Any, Callable, Sequence

import torch

from ddpm import GUIDANCE
from lib.config import RULES
from lib.errors import Interrupted, RunStopped, UsageError
from lib.samplers import DEFAULT_SAMPLER, SAMPLERS


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are :class:`UsageError` (one line) instead of usage + exit, and whose
    description (a script's docstring, with its examples) is shown as it is written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def run_cli(prog: str, body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run ``body(argv)``; a :class:`UsageError` becomes ``prog: error: ...`` and exit status 2, a run that stopped
    early its one line and its own status (1, or 130 / 143 for an interrupt that saved its work)."""
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
    """An argparse type for one of ``lib.config.RULES``: the value, or an error saying what was expected."""
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
non_negative_float = typed("non_negative_float")


def pick_device(name: str | None) -> torch.device:
    """``None`` -> cuda, then mps, then cpu; otherwise check that the named device is here."""
    available = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                 "mps": int(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())}
    if name is None:
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if available[kind]))
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in available:
        raise UsageError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    if available[device.type] <= (device.index or 0):
        raise UsageError(f"--device {name}: {device.type.upper()} is not available on this machine (found "
                         f"{available[device.type]}); use --device cpu")
    return device


def add_sampling_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    """The flags that say how images are generated (``sample.py``, ``evaluate.py``); ``many``: lists of them."""
    nargs = "+" if many else None
    listed = "; ".join(f"{name}: {info.summary}" for name, info in SAMPLERS.items())
    default = SAMPLERS[DEFAULT_SAMPLER]
    p.add_argument("--sampler", choices=list(SAMPLERS), nargs=nargs,
                   help=f"{listed} (default: {DEFAULT_SAMPLER}, {default.steps} steps)")
    p.add_argument("--steps", type=positive_int, nargs=nargs, help="steps of a sampler that takes them")
    p.add_argument("--guidance", type=non_negative_float, nargs=nargs, default=[GUIDANCE] if many else GUIDANCE,
                   help=f"classifier-free guidance scale s: 0 unconditional, 1 conditional (default {GUIDANCE:g})")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--batch-size", type=positive_int, default=100,
                   help="images generated at once (default 100); the noise is drawn one batch at a time, so a "
                        "seed gives the same images at the same batch size")
