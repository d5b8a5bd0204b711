"""Reproduce the original README's study: train every (T, n_feat) configuration, then measure each.

    python tools/study.py --data-root DATA     # its four: T 500 1000 x n_feat 128 256, 20 epochs
    python tools/study.py --preset cpu --n-feat 16 32 --data-root DATA    # scaled down, for a CPU

For every configuration this trains with ``lib.training.train`` (the per-epoch grids and loss plot land in
--out-dir under the names ``train.py`` gives them), then draws ``--eval-n`` digits of
every class with the full ancestral sampler and with the few-step sampler (``--sampler``, default: the
project's default sampler with its default steps), scores them with ``evaluate.py``'s classifier, and
writes one table (``<out-dir>/study.md``): final loss, accuracy and FID for both samplers,
training time, and seconds per generated image. The model after epoch 1 (kept as ``early_<name>.pt``) is
scored too, with the digits it most often draws instead of the one asked for. A finished configuration
is not trained again, an interrupted one is resumed, so the command can be rerun after a stop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lib import classifier as clf  # noqa: E402
from lib.checkpoint import load_sampler, load_training_checkpoint, run_name  # noqa: E402
from lib.cli import ArgumentParser, pick_device, positive_int, run_cli  # noqa: E402
from lib.config import PRESETS, Config  # noqa: E402
from lib.data import load_dataset, to_uint8  # noqa: E402
from lib.errors import UsageError  # noqa: E402
from lib.fileio import atomic_write, ensure_writable_dir, write_text  # noqa: E402
from lib.metrics import Reference  # noqa: E402
from lib.samplers import DEFAULT_SAMPLER, SAMPLERS, Sampling, generate, requested_labels  # noqa: E402
from lib.speed import default_speed  # noqa: E402
from lib.training import claim_outputs, output_paths, train  # noqa: E402

EARLY_EPOCH = 1  # the epoch whose model is checked for blends of similar digits


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="study.py", description="Train and measure every (T, n_feat) configuration.")
    p.add_argument("--T", type=positive_int, nargs="+", default=[500, 1000], help="diffusion steps (default 500 1000)")
    p.add_argument("--n-feat", type=positive_int, nargs="+", default=[128, 256], help="UNet widths (default 128 256)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="train.py preset for everything else (default: default)")
    p.add_argument("--epochs", type=positive_int, help="epochs per configuration (default: the preset's)")
    p.add_argument("--eval-n", type=positive_int, default=100, help="digits per class for each score (default 100)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the scored samples (default 2)")
    p.add_argument("--sampler", choices=[name for name, info in SAMPLERS.items() if info.steps],
                   default=DEFAULT_SAMPLER,
                   help=f"the few-step sampler scored beside the full one (default {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=positive_int, help="its steps (default: the sampler's own)")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/raw (default ./data)")
    p.add_argument("--out-dir", default="study", help="where runs and the table go (default ./study)")
    p.add_argument("--classifier-cache", help="the classifier file (default: the bundled one)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    args = p.parse_args(argv)
    for T in args.T:
        for n_feat in args.n_feat:
            configuration(args, T, n_feat)  # every configuration is checked before any work
    return args


def configuration(args: argparse.Namespace, T: int, n_feat: int) -> Config:
    """The preset with this ``T`` and ``n_feat`` (and ``--epochs``), checked."""
    chosen = {"T": T, "n_feat": n_feat, **({"epochs": args.epochs} if args.epochs else {})}
    return PRESETS[args.preset].override(**chosen).validate()


def train_configuration(args: argparse.Namespace, config: Config, data: tuple[torch.Tensor, torch.Tensor],
                        device: torch.device) -> dict[str, Any]:
    """Train (or resume, or reuse) one configuration; returns its checkpoint."""
    paths = output_paths(args.out_dir, run_name(config))
    T, n_feat, wanted = config.diffusion.T, config.model.n_feat, config.training.epochs
    ckpt = load_training_checkpoint(paths["checkpoint"]) if os.path.exists(paths["checkpoint"]) else None
    if ckpt is not None:
        check_same_run(paths["checkpoint"], ckpt["config"], config)
    if ckpt is not None and ckpt["epoch"] >= wanted:
        print(f"T={T} n_feat={n_feat}: already trained ({paths['checkpoint']})", file=sys.stderr)
        return ckpt
    images, labels = data
    with claim_outputs(args.out_dir, paths):
        train(config, images.to(device), labels.to(device), paths, default_speed(device), ckpt=ckpt,
              after_epoch=lambda epoch: keep_early(paths, epoch))
    return load_training_checkpoint(paths["checkpoint"])


def early_path(paths: dict[str, str]) -> str:
    return paths["checkpoint"].replace("ddpm_", f"early_epoch{EARLY_EPOCH}_", 1)


def keep_early(paths: dict[str, str], epoch: int) -> None:
    """A copy of the checkpoint after epoch :data:`EARLY_EPOCH`, to measure the blends of an early model."""
    if epoch == EARLY_EPOCH:
        atomic_write(early_path(paths), lambda tmp: shutil.copyfile(paths["checkpoint"], tmp))


def check_same_run(path: str, stored: Config, config: Config) -> None:
    """A :class:`UsageError` if the checkpoint at ``path`` is of another configuration than ``config``."""
    old, new = stored.flat(), config.flat()
    differ = [f"{name} {old[name]}, not {new[name]}" for name in new if old[name] != new[name]]
    if stored.preset != config.preset:
        differ.insert(0, f"preset {stored.preset}, not {config.preset}")
    if differ:
        raise UsageError(f"{path!r} is a run of another configuration ({'; '.join(differ[:3])}); "
                         "use another --out-dir, or remove it to train this one")


def confusions(predicted: torch.Tensor, labels: torch.Tensor, top: int = 3) -> list[tuple[int, int, float]]:
    """The ``top`` most frequent (asked for, read as, share of those asked for) mistakes."""
    found = []
    for k in labels.unique().tolist():
        asked = predicted[labels == k]
        for j in asked.unique().tolist():
            if j != k:
                found.append((k, j, (asked == j).float().mean().item()))
    return sorted(found, key=lambda c: -c[2])[:top]


def score_samples(path: str, how: Sampling, n: int, ref: Reference, device: torch.device) -> dict[str, Any]:
    """Accuracy, FID, top confusions and seconds per image of ``n`` digits per class."""
    ddpm, _ = load_sampler(path, device)
    labels = requested_labels(None, n, ddpm.model.n_classes)
    started = time.perf_counter()
    x = generate(ddpm, labels, how.resolve(ddpm.T), seed=0, batch_size=100)
    seconds = time.perf_counter() - started
    images = to_uint8(x)
    score = ref.score(images, labels)
    predicted = ref.space.embed(images)["predicted"]
    return {"accuracy": score["accuracy"], "fid": score["fid"], "seconds_per_image": seconds / len(labels),
            "confusions": confusions(predicted, labels)}


def measure(args: argparse.Namespace, out: dict[str, str], ref: Reference, device: torch.device) -> dict[str, Any]:
    """The final model with the full sampler and with the few-step one; the early model with the few-step one."""
    full, few = Sampling("ddpm", guidance=args.guidance), few_step_sampling(args)
    row = {"full": score_samples(out["checkpoint"], full, args.eval_n, ref, device),
           "few": score_samples(out["checkpoint"], few, args.eval_n, ref, device)}
    early = early_path(out)
    row["early"] = score_samples(early, few, args.eval_n, ref, device) if os.path.exists(early) else None
    return row


def few_step_sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(args.sampler, args.steps, guidance=args.guidance)


def _mistakes(found: list[tuple[int, int, float]]) -> str:
    return ", ".join(f"{k}→{j} {100 * share:.0f}%" for k, j, share in found) or "none"


def format_table(rows: list[dict[str, Any]], floor: dict[str, Any], few: str) -> str:
    lines = [f"| T | n_feat | epochs | final loss | train time | accuracy, full T | FID, full T | "
             f"accuracy, {few} | FID, {few} | s / image, full T | s / image, {few} | "
             f"epoch {EARLY_EPOCH}: accuracy, {few} | epoch {EARLY_EPOCH}: top mistakes | final: top mistakes, {few} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        early = r["early"]
        lines.append(f"| {r['T']} | {r['n_feat']} | {r['epochs']} | {r['final_loss']:.4f} | "
                     f"{r['train_seconds'] / 60:.1f} min | {100 * r['full']['accuracy']:.1f}% | "
                     f"{r['full']['fid']:.3f} | {100 * r['few']['accuracy']:.1f}% | {r['few']['fid']:.3f} | "
                     f"{r['full']['seconds_per_image']:.3f} | {r['few']['seconds_per_image']:.3f} | "
                     + (f"{100 * early['accuracy']:.1f}% | {_mistakes(early['confusions'])} | "
                        if early else "- | - | ")
                     + f"{_mistakes(r['few']['confusions'])} |")
    lines.append(f"| real training digits ({floor['n']}) | | | | | | {floor['fid']:.3f} | | {floor['fid']:.3f} | "
                 "| | | | |")
    return "\n".join(lines)


def measure_configuration(args: argparse.Namespace, config: Config, data: tuple[torch.Tensor, torch.Tensor],
                          ref: Reference, device: torch.device) -> dict[str, Any]:
    """Train (or reuse) one configuration and measure it: one row of the table."""
    ckpt = train_configuration(args, config, data, device)
    steps_per_epoch = len(ckpt["losses"]) // ckpt["epoch"]
    row = {"T": config.diffusion.T, "n_feat": config.model.n_feat, "epochs": ckpt["epoch"],
           "train_seconds": ckpt["train_seconds"],
           "final_loss": sum(ckpt["losses"][-steps_per_epoch:]) / steps_per_epoch,
           **measure(args, output_paths(args.out_dir, run_name(config)), ref, device)}
    return row


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    ensure_writable_dir(args.out_dir, "output folder")
    device = pick_device(args.device)
    data = load_dataset(args.data_root, train=True)
    model, info = clf.load_or_train(args.data_root, args.classifier_cache or clf.default_classifier("mnist"))
    ref = Reference(model, data, load_dataset(args.data_root, train=False, download=False))
    floor = ref.floor(requested_labels(None, args.eval_n, 10))
    few = few_step_sampling(args).resolve(min(args.T)).describe()
    rows = []
    for T in dict.fromkeys(args.T):  # each value once, in the order given
        for n_feat in dict.fromkeys(args.n_feat):
            rows.append(measure_configuration(args, configuration(args, T, n_feat), data, ref, device))
            print(format_table(rows[-1:], floor, few).splitlines()[-2], file=sys.stderr, flush=True)
    table = format_table(rows, floor, few)
    header = (f"guidance {args.guidance}, {args.eval_n} digits per class per score, sampling on {device}; "
              f"classifier {100 * info['test_accuracy']:.2f}% on the test split\n\n")
    atomic_write(os.path.join(args.out_dir, "study.md"), lambda tmp: write_text(tmp, header + table + "\n"))
    print(header + table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("study.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
