"""The training-recipe ablation: train each recipe at each budget, score each with evaluate.py, one table.

    python benchmarks/recipes.py --data-root DATA --out-dir runs/recipes                 # everything, one by one
    python benchmarks/recipes.py --data-root DATA --only base min-snr --epochs 8 --jobs 2
    python benchmarks/recipes.py --data-root DATA --list                                 # the recipes

Every recipe is ``train.py --preset cpu-2020`` (the CPU preset's small model with the 2020 recipe) plus a few flags
(:data:`RECIPES`), trained in fp32 (``--no-amp``) for ``--epochs`` (each epoch of the 10,000-digit subset at
batch 64 is 157 optimisation steps), then scored by ``evaluate.py`` with the default sampler for every ``--seeds``
value (``--n`` digits per class).
``--jobs`` runs that many trainings (and then scorings) at once, for a GPU that small runs leave idle.
A recipe already trained is not trained again; one stopped early is resumed. The table goes to
``<out-dir>/recipes.md``: accuracy, FID, precision and recall per recipe, budget and seed, then the real-data floor
of each metric.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint import checkpoints_in, load_checkpoint, newest_checkpoint  # noqa: E402
from classifier import default_classifier  # noqa: E402
from cli import ArgumentParser, non_negative_float, positive_int, run_cli  # noqa: E402
from config import UsageError  # noqa: E402

# Flags shared by the recipes built on D: `v` prediction and encoder conditioning (D-b32: at batch 32;
# D-muon: with Muon).
D = ["--prediction", "v", "--cond-encoder", "1"]
D_B32 = [*D, "--batch-size", "32"]
D_MUON = [*D, "--optimizer", "muon"]
D_MUON_SHORT = [*D_MUON, "--beta-end", "0.02"]  # Muon with the shorter schedule, the nearest at 40%
LOG_NORMAL_WIDE = ["--t-sampling", "log-normal", "--log-sigma-mean", "-0.4", "--log-sigma-std", "1.8"]
LOG_NORMAL_WIDER = ["--t-sampling", "log-normal", "--log-sigma-mean", "0", "--log-sigma-std", "2"]

# Every recipe is this preset plus its flags: the 2020 recipe, so that the tables in docs/recipes.md keep their meaning.
BASE_PRESET = "cpu-2020"

# name -> flags on top of BASE_PRESET. One change at a time, then combinations.
RECIPES: dict[str, list[str]] = {
    "base": [],
    "min-snr": ["--loss-weight", "min-snr"],
    "v": ["--prediction", "v"],
    "x0": ["--prediction", "x0"],
    "cosine-betas": ["--schedule", "cosine"],
    "cosine-lr": ["--lr-schedule", "cosine", "--warmup", "100"],
    "lr-2e-3": ["--lr", "2e-3"],
    "ema-0.99": ["--ema-decay", "0.99"],
    "ema-0.999": ["--ema-decay", "0.999"],
    "batch-128": ["--batch-size", "128"],
    "cond-encoder": ["--cond-encoder", "1"],
    "A": ["--loss-weight", "min-snr", "--lr-schedule", "cosine", "--warmup", "100", "--cond-encoder", "1"],
    "B": ["--loss-weight", "min-snr", "--lr-schedule", "cosine", "--warmup", "100", "--cond-encoder", "1",
          "--prediction", "v"],
    "C": ["--loss-weight", "min-snr", "--lr-schedule", "cosine", "--warmup", "100", "--cond-encoder", "1",
          "--prediction", "v", "--schedule", "cosine"],
    # The two changes that help alone, then the same images in smaller batches (more steps).
    "D": D,
    "D-b32": D_B32,
    "D-b16": [*D, "--batch-size", "16"],
    "D-b32-cosine-lr": [*D_B32, "--lr-schedule", "cosine", "--warmup", "100"],
    "D-b32-lr-2e-3": [*D_B32, "--lr", "2e-3"],
    # Smaller steps at batch 32: Adam's square-root rule from the preset's 1e-3 at batch 64 gives 7e-4.
    "D-b32-lr-7e-4": [*D_B32, "--lr", "7e-4"],
    "D-b32-lr-5e-4": [*D_B32, "--lr", "5e-4"],
    # The two lower-noise steps that tied at batch 64, at the batch whose steps are noisier.
    "D-b32-stratified": [*D_B32, "--t-sampling", "stratified"],
    "D-b32-adam-beta2-0.99": [*D_B32, "--adam-beta2", "0.99"],
    # Fewer of the training steps at almost pure noise (uniform t spends 42% of them at sigma > 5.4).
    "D-b32-beta-end-0.02": [*D_B32, "--beta-end", "0.02"],
    "D-b32-log-normal": [*D_B32, "--t-sampling", "log-normal"],
    "D-b32-log-normal-wide": [*D_B32, *LOG_NORMAL_WIDE],
    "D-b32-log-normal-wider": [*D_B32, *LOG_NORMAL_WIDER],
    # Noise prediction again, where its weak spot (the almost pure noise of beta-end 0.04) is smaller.
    "enc-b32-beta-end-0.02": ["--cond-encoder", "1", "--batch-size", "32", "--beta-end", "0.02"],
    "D-b32-p-uncond-0.2": [*D_B32, "--p-uncond", "0.2"],
    # The other direction: more of each batch spent on the conditional model that guidance 2 mostly follows.
    "D-b32-p-uncond-0.05": [*D_B32, "--p-uncond", "0.05"],
    "D-b32-beta-end-0.02-log-normal-wide": [*D_B32, "--beta-end", "0.02", *LOG_NORMAL_WIDE],
    # Smaller batches with a longer EMA to average out their noisier steps.
    "D-b32-ema-0.999": [*D_B32, "--ema-decay", "0.999"],
    "D-b16-ema-0.999": [*D, "--batch-size", "16", "--ema-decay", "0.999"],
    # Batch 64 (the preset's, the fastest per image) with the larger steps that batch 32's noise scale implies.
    "D-lr-2e-3": [*D, "--lr", "2e-3"],
    # Does encoder conditioning cost the v models their recall?
    "v-b32": ["--prediction", "v", "--batch-size", "32"],
    # Less weight on the almost pure noise, by the loss instead of by the draws; and a spread between the two
    # log-normals above, with the shorter schedule.
    "D-b32-truncated-snr-0.1": [*D_B32, "--loss-weight", "truncated-snr", "--snr-floor", "0.1"],
    "D-b32-beta-end-0.02-log-normal-wider": [*D_B32, "--beta-end", "0.02", *LOG_NORMAL_WIDER],
    # Is it the width? 1.5 times the channels, about twice the work per image (so not a candidate for the preset).
    "D-n48": [*D, "--n-feat", "48"],
    "D-b32-n48": [*D_B32, "--n-feat", "48"],
    "D-b32-n48-beta-end-0.02-log-normal-wide": [*D_B32, "--n-feat", "48", "--beta-end", "0.02", *LOG_NORMAL_WIDE],
    # Width 48 with the schedule that bought accuracy at width 32, without the log-normal that cost it; and the
    # width-48 combination at width 40, about 1.5 times the preset's work per image.
    "D-b32-n48-beta-end-0.02": [*D_B32, "--n-feat", "48", "--beta-end", "0.02"],
    "D-b32-n40-beta-end-0.02-log-normal-wide": [*D_B32, "--n-feat", "40", "--beta-end", "0.02", *LOG_NORMAL_WIDE],
    # The width-32 combination at batch 64, the only batch at which 40% of the images come near 5 minutes of fp32.
    "D-beta-end-0.02-log-normal-wide": [*D, "--beta-end", "0.02", *LOG_NORMAL_WIDE],
    # Two changes that lower the noise of each step at batch 64: timesteps spread evenly over each batch, and
    # an Adam that adapts to the gradients' scale ten times sooner.
    "D-stratified": [*D, "--t-sampling", "stratified"],
    "D-adam-beta2-0.99": [*D, "--adam-beta2", "0.99"],
    # Twice the step size lost at batch 64 (D-lr-2e-3); the other direction.
    "D-lr-5e-4": [*D, "--lr", "5e-4"],
    # Time and label in every residual block's norm, as modern diffusion UNets do (AdaGN): the same convolutions.
    "D-ada-norm": [*D, "--ada-norm", "1"],
    # Gradients clipped to norm 1, at the preset's step size and at twice it (which lost unclipped).
    "D-clip-1": [*D, "--grad-clip", "1"],
    "D-lr-2e-3-clip-1": [*D, "--lr", "2e-3", "--grad-clip", "1"],
    # Conditioned residual blocks at the 7x7 bottleneck, which the seed's network skips (pooled straight to a vector).
    "D-mid-2": [*D, "--mid-blocks", "2"],
    "D-mid-4": [*D, "--mid-blocks", "4"],
    # Self-conditioning (Chen et al. 2022): the network also reads its own estimate of the clean image; half of
    # each batch pays one more forward pass for it.
    "D-b32-self-cond": [*D_B32, "--self-cond", "1"],
    "D-self-cond": [*D, "--self-cond", "1"],
    # Immiscible diffusion (Li et al. 2024, 2025): each image diffused with a noise draw near it, so that the
    # paths from different images to noise cross less.
    "D-b32-assign": [*D_B32, "--noise-pairing", "assign"],
    "D-b32-knn": [*D_B32, "--noise-pairing", "knn"],
    # Muon (Jordan et al. 2024) for the hidden weight matrices, Adam for the rest, at batches 64 and 32, and
    # Muon's step size at half and twice the default multiple of --lr.
    "D-muon": D_MUON,
    "D-b32-muon": [*D_B32, "--optimizer", "muon"],
    "D-muon-lr-mult-1": [*D_MUON, "--muon-lr-mult", "1"],
    "D-muon-lr-mult-4": [*D_MUON, "--muon-lr-mult", "4"],
    # Muon at batch 48: more steps than batch 64 from the same images, at nearly its speed per image.
    "D-b48-muon": [*D_MUON, "--batch-size", "48"],
    # Muon's run annealed to a step size of zero (a cosine after 100 steps of warm-up) instead of ending at 1/epochs.
    "D-muon-cosine-lr": [*D_MUON, "--lr-schedule", "cosine", "--warmup", "100"],
    # Muon with EDM's log-normal noise levels at the two wide spreads: more training at the high noise
    # levels where a digit's shape is decided.
    "D-muon-log-normal-wide": [*D_MUON, *LOG_NORMAL_WIDE],
    "D-muon-log-normal-wider": [*D_MUON, *LOG_NORMAL_WIDER],
    # ... and with the shorter schedule, alone and with the wide spread: the combination that came nearest
    # the preset's FID and recall with Adam.
    "D-muon-beta-end-0.02": D_MUON_SHORT,
    "D-muon-beta-end-0.02-log-normal-wide": [*D_MUON_SHORT, *LOG_NORMAL_WIDE],
    # A shorter EMA for the short run: the power-function warm-up at gamma 16 (sigma_rel 0.05) instead of 8 (0.09).
    "D-muon-beta-end-0.02-ema-gamma-16": [*D_MUON_SHORT, "--ema-gamma", "16"],
    # The schedule shorter still (the trend from 0.04 to 0.02, one step further), and twice Adam's step size for
    # the parameters Muon leaves to Adam (the norms, biases, label embedding, first and last convolution) at
    # Muon's own step size unchanged (lr x muon-lr-mult stays 2e-3).
    "D-muon-beta-end-0.015": [*D_MUON, "--beta-end", "0.015"],
    "D-muon-beta-end-0.02-adam-lr-2e-3": [*D_MUON_SHORT, "--lr", "2e-3", "--muon-lr-mult", "1"],
    # Twice the dropped labels: Muon's surplus of accuracy and precision traded for the "no label" model that
    # guidance extrapolates from, which moved D-b32 toward FID with Adam.
    "D-muon-beta-end-0.02-p-uncond-0.2": [*D_MUON_SHORT, "--p-uncond", "0.2"],
    # ... further along the same trade (three, four and five dropped labels in ten), and with the shorter EMA
    # of gamma 16.
    "D-muon-beta-end-0.02-p-uncond-0.3": [*D_MUON_SHORT, "--p-uncond", "0.3"],
    "D-muon-beta-end-0.02-p-uncond-0.2-ema-gamma-16": [*D_MUON_SHORT, "--p-uncond", "0.2", "--ema-gamma", "16"],
    "D-muon-beta-end-0.02-p-uncond-0.4": [*D_MUON_SHORT, "--p-uncond", "0.4"],
    "D-muon-beta-end-0.02-p-uncond-0.5": [*D_MUON_SHORT, "--p-uncond", "0.5"],
    "D-muon-beta-end-0.02-p-uncond-0.3-ema-gamma-16": [*D_MUON_SHORT, "--p-uncond", "0.3", "--ema-gamma", "16"],
    # The best recipe at the full budget with the shortest EMA measured there (gamma 32 never reaches the 0.995 cap).
    "D-muon-beta-end-0.02-p-uncond-0.4-ema-gamma-32": [*D_MUON_SHORT, "--p-uncond", "0.4", "--ema-gamma", "32"],
}
ROW = re.compile(r"^\| (?P<name>[^|]+) \| (?P<guidance>[^|]+) \| (?P<n>\d+) \| (?P<acc>[\d.]+)% \| (?P<fid>[\d.]+) \| "
                 r"(?P<precision>[\d.]+) \| (?P<recall>[\d.]+) \|")


def run_name(recipe: str, epochs: int) -> str:
    return f"{recipe}_e{epochs}"


def train(recipe: str, epochs: int, args) -> str:
    """Train one recipe (unless done; a run stopped early is resumed); the path of its checkpoint."""
    out = os.path.join(args.out_dir, run_name(recipe, epochs))
    found = checkpoints_in(os.path.join(out, "checkpoints"))
    if not found or load_checkpoint(found[0])["epoch"] < epochs:
        command = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", BASE_PRESET,
                   "--data-root", args.data_root, "--no-download", "--out-dir", out, "--epochs", str(epochs),
                   "--no-amp", *RECIPES[recipe], *shlex.split(args.train_args), *(["--resume"] if found else [])]
        log(out, "train", command)
    return newest_checkpoint(os.path.join(out, "checkpoints"))


def score(recipe: str, epochs: int, seed: int, args) -> list[str]:
    """evaluate.py's table rows (one per guidance scale) and then its floor row, for one trained recipe and seed."""
    out = os.path.join(args.out_dir, run_name(recipe, epochs))
    command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", train(recipe, epochs, args),
               "--data-root", args.data_root, "--n", str(args.n), "--seed", str(seed), "--batch-size", "1000",
               "--classifier-cache", args.classifier_cache, "--guidance", *map(str, args.guidance)]
    text = log(out, f"evaluate_seed{seed}", command)
    rows = [m for m in map(ROW.match, text.splitlines()) if m]
    if len(rows) != len(args.guidance) + 1:
        raise UsageError(f"evaluate.py printed no score table for {run_name(recipe, epochs)}; see its log in {out}")
    return [table_row(recipe, epochs, seed, m) for m in rows[:-1]] + [
        table_row("real digits (floor)", epochs, seed, rows[-1])]


def log(out: str, what: str, command: list[str]) -> str:
    """Run ``command``, keep its output in ``<out>/<what>.log``, return its stdout; a failure is an error."""
    os.makedirs(out, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True)
    with open(os.path.join(out, f"{what}.log"), "w") as f:
        f.write(" ".join(command) + "\n" + done.stdout + done.stderr[-20000:])
    if done.returncode:
        raise UsageError(f"{what} of {out} failed (exit {done.returncode}); see {out}/{what}.log")
    return done.stdout


def table_row(recipe: str, epochs: int, seed: int, m: re.Match) -> str:
    flags = " ".join(RECIPES.get(recipe, [])) or "-"
    return (f"| {recipe} | `{flags}` | {epochs} | {seed} | {m['guidance'].strip()} | {m['acc']}% | {m['fid']} | "
            f"{m['precision']} | {m['recall']} |")


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog="recipes.py", description="Train and score training recipes at fixed budgets.")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/raw (default ./data)")
    p.add_argument("--out-dir", default="runs/recipes", help="where runs and recipes.md go (default runs/recipes)")
    p.add_argument("--only", nargs="+", choices=list(RECIPES), help="these recipes (default: all)")
    p.add_argument("--epochs", type=positive_int, nargs="+", default=[8], help="budgets in epochs (default 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (default 0 1)")
    p.add_argument("--guidance", type=non_negative_float, nargs="+", default=[2.0],
                   help="guidance scales to score each run at (default 2, evaluate.py's)")
    p.add_argument("--n", type=positive_int, default=100, help="digits per class per score (default 100)")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs at once (default 1)")
    p.add_argument("--list", action="store_true", help="print the recipes and stop")
    p.add_argument("--train-args", default="", help="more train.py flags for every run, one string "
                                                     "(--train-args='--grid-steps 0')")
    p.add_argument("--classifier-cache", help="evaluate.py's classifier (default: the bundled one)")
    args = p.parse_args(argv)
    args.classifier_cache = args.classifier_cache or default_classifier()
    if args.list:
        print("\n".join(f"{name}: {' '.join(flags) or f'(the {BASE_PRESET} preset)'}"
                        for name, flags in RECIPES.items()))
        return 0
    runs = [(r, e) for e in args.epochs for r in (args.only or RECIPES)]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda run: train(*run, args), runs))
        log(args.out_dir, "classifier", [sys.executable, os.path.join(ROOT, "classifier.py"), "--data-root",
                                         args.data_root, "--cache", args.classifier_cache])
        scored = list(pool.map(lambda job: score(*job, args), [(*run, s) for run in runs for s in args.seeds]))
    lines = [f"| recipe | flags on `--preset {BASE_PRESET}` | epochs | seed | guidance | accuracy | FID | precision "
             "| recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [row for rows in scored for row in rows[:-1]] + sorted({rows[-1] for rows in scored})
    with open(os.path.join(args.out_dir, "recipes.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("recipes.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
