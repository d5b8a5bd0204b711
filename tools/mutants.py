"""Mutation testing of the diffusion core: every hand-made defect below must make the test suite fail.

    python tools/mutants.py              # every mutant, two at a time: which test kills each
    python tools/mutants.py --list       # the mutants, without running them
    python tools/mutants.py ema-skipped cfg-base   # only these

Each mutant replaces one exact piece of the code (it must occur exactly once) in a copy of the project and
runs the suite on the copy with ``-x``, the core's tests first, so a killed mutant costs seconds. A mutant is
*killed* when a test fails; one that passes the whole suite *survived*: a defect no test can see. The exit
status is 1 if any survived. The table it prints is the one in docs/design.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the core's tests first: a defect of the core is usually caught there, in seconds
FIRST = ("tests/test_core.py", "tests/test_samplers.py", "tests/test_training.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the project
    old: str
    new: str
    what: str


S, T = "lib/samplers.py", "lib/training.py"
MUTANTS = (
    Mutant("posterior-mean-sign", S, "(x - ddpm.eps_coef[t] * eps(x, t))", "(x + ddpm.eps_coef[t] * eps(x, t))",
           "Algorithm 2's mean adds the noise estimate instead of removing it"),
    Mutant("posterior-mean-coef", "ddpm.py", '"eps_coef": betas / (1.0 - alphas_cumprod).sqrt(),',
           '"eps_coef": betas / (1.0 - alphas_cumprod),', "the mean's eps coefficient without its square root"),
    Mutant("posterior-variance", S, "x = mean + ddpm.posterior_variance[t].sqrt() * noise()",
           "x = mean + ddpm.posterior_variance[t] * noise()", "the reverse step's noise scaled by the variance"),
    Mutant("q-sample-swapped", "ddpm.py",
           "extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0\n"
           "                + extract(self.sqrt_one_minus_alphas_cumprod",
           "extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0\n"
           "                + extract(self.sqrt_alphas_cumprod",
           "q_sample's two coefficients swapped"),
    Mutant("q-sample-no-sqrt", "ddpm.py", "return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0",
           "return (extract(self.alphas_cumprod, t, x0.ndim) * x0", "q_sample scales x0 by a_bar, not sqrt(a_bar)"),
    Mutant("v-target-sign", "ddpm.py", "- extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)",
           "+ extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)", "the v target with x0's sign flipped"),
    Mutant("v-to-eps", "ddpm.py", "return extract(self.sqrt_alphas_cumprod, t, x.ndim) * out + extract(",
           "return extract(self.sqrt_alphas_cumprod, t, x.ndim) * out - extract(",
           "the v output turned into a noise estimate with the wrong sign"),
    Mutant("cfg-base", "ddpm.py", "return eps_uncond + scale * (eps_cond - eps_uncond)",
           "return eps_cond + scale * (eps_cond - eps_uncond)", "guidance extrapolates from the conditional estimate"),
    Mutant("cfg-cond-half", "ddpm.py", "torch.cat((labels, null))", "torch.cat((null, null))",
           "the conditional half of the guided batch gets no label"),
    Mutant("cfg-uncond-half", "ddpm.py", "torch.cat((labels, null))", "torch.cat((labels, labels))",
           "the unconditional half of the guided batch gets the label"),
    Mutant("cfg-halves-swapped", "ddpm.py", "eps_cond, eps_uncond = both.chunk(2)",
           "eps_uncond, eps_cond = both.chunk(2)",
           "the two halves of the guided batch read the wrong way round"),
    Mutant("cfg-scale-1", "ddpm.py", "labels if scale else null", "null if scale else null",
           "guidance 1 (plain conditional) asks without the label"),
    Mutant("cfg-scale-0", "ddpm.py", "labels if scale else null", "labels if scale else labels",
           "guidance 0 (unconditional) keeps the label"),
    Mutant("sampling-timestep", "ddpm.py", "t_batch = torch.full((x.shape[0],), t,",
           "t_batch = torch.full((x.shape[0],), max(t - 1, 0),", "the sampler hands the network the next timestep"),
    Mutant("training-timestep", "ddpm.py", "self.model(self.q_sample(x0, t, noise), t, labels)",
           "self.model(self.q_sample(x0, t, noise), self.T - 1 - t, labels)", "training hands the network t mirrored"),
    Mutant("interval-inverted", "ddpm.py", "inside = [interval is None or interval[0] < s <= interval[1]",
           "inside = [interval is None or not interval[0] < s <= interval[1]", "guidance outside the interval"),
    Mutant("interval-sigma", "ddpm.py", '"sigmas": ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt(),',
           '"sigmas": (alphas_cumprod / (1.0 - alphas_cumprod)).sqrt(),', "the interval measured in 1 / sigma"),
    Mutant("interval-ignored", "ddpm.py", "scale if scale <= 1 or inside[t] else 1.0", "scale",
           "the guidance applies at every step whatever the interval"),
    Mutant("dpm-extrapolation", S, "estimate = x0 + (x0 - before[1]) / (2 * r)", "estimate = x0 + (x0 - before[1]) / r",
           "DPM-Solver++(2M) extrapolates to the end of the step, not its middle"),
    Mutant("dpm-ratio", S, "r = (lam[t] - lam[before[0]]) / (lam[t_prev] - lam[t])",
           "r = (lam[t_prev] - lam[t]) / (lam[t] - lam[before[0]])", "the step-size ratio r upside down"),
    Mutant("dpm-history", S, "before = (t, x0)", "before = (t, estimate)",
           "DPM-Solver++ remembers its extrapolation instead of the network's prediction"),
    Mutant("ema-skipped", T, "    update_ema(state.ema, state.ddpm.model, ema_decay)\n", "",
           "the EMA is never updated"),
    Mutant("ema-weight", T, "list(model.parameters()), 1.0 - decay)", "list(model.parameters()), decay)",
           "the EMA weighs the new weights by the decay"),
    Mutant("ema-warm-up-reset", T, "ema_decay_at(step + i)", "ema_decay_at(i)",
           "the EMA's warm-up restarts every epoch"),
    Mutant("ema-warm-up-formula", T, "return min(decay, (1.0 + step) / (gamma + 2.0 + step))",
           "return min(decay, (1.0 + step) / (gamma + 1.0 + step))", "the warm-up's power-function decay off by one"),
    Mutant("label-dropout-ignored", "ddpm.py",
           "labels = torch.where(drop, torch.full_like(labels, self.model.null_label), labels)",
           "labels = labels", "the drawn label dropout is never applied"),
    Mutant("label-dropout-rate", "ddpm.py", "< self.p_uncond", "> self.p_uncond",
           "labels dropped with probability 1 - p_uncond"),
    Mutant("loss-target", "ddpm.py", "labels), self.target(x0, t, noise))", "labels), noise)",
           "the loss always targets the noise, whatever the prediction"),
    Mutant("loss-l1", "ddpm.py", "return F.mse_loss(self.model(", "return F.l1_loss(self.model(",
           "the loss is the mean absolute error"),
    Mutant("checkpoint-ema-saved", T, "ema=state.ema.state_dict(),",
           "ema=state.ddpm.model.state_dict(),", "the checkpoint stores the raw weights as the EMA"),
    Mutant("checkpoint-ema-resumed", T, 'ema.load_state_dict(ckpt["ema"])',
           'ema.load_state_dict(ckpt["model"])', "a resumed run restarts its EMA from the raw weights"),
    Mutant("checkpoint-ema-sampled", "lib/checkpoint.py", 'weights: str = "ema"', 'weights: str = "model"',
           "sampling loads the raw weights instead of the EMA"),
    Mutant("checkpoint-ema-exported", "tools/export_weights.py", 'for k, v in ckpt["ema"].items()}',
           'for k, v in ckpt["model"].items()}', "the weights file exports the raw weights"),
)


def project_files() -> list[str]:
    """The project's tracked files (what a fresh clone holds), relative to its root."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in listed.stdout.decode().split("\0") if name]


def copy_project(target: str) -> None:
    for name in project_files():
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):  # a file deleted in the work tree but not yet in git is skipped
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, name))


def mutated(mutant: Mutant, root: str) -> str:
    """The text of ``mutant``'s file under ``root`` with the mutation made; an error unless its code occurs once."""
    with open(os.path.join(root, mutant.path)) as f:
        text = f.read()
    if text.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name}: the code it replaces occurs {text.count(mutant.old)} times in "
                         f"{mutant.path}, not once; update tools/mutants.py")
    return text.replace(mutant.old, mutant.new)


def test_order(root: str) -> list[str]:
    """Every test file, the core's first (a folder argument would make pytest use its own order)."""
    files = sorted(f"tests/{name}" for name in os.listdir(os.path.join(root, "tests"))
                   if name.startswith("test_") and name.endswith(".py"))
    return [name for name in FIRST if name in files] + [name for name in files if name not in FIRST]


def run(mutant: Mutant, timeout: float) -> dict:
    """Apply ``mutant`` to a fresh copy and run the suite there until the first failure."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as root:
        copy_project(root)
        text = mutated(mutant, root)
        with open(os.path.join(root, mutant.path), "w") as f:
            f.write(text)
        started = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *test_order(root)], cwd=root, capture_output=True, text=True, timeout=timeout,
                                  env=env)
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.M)
            killer = failed[0] if failed else ("(the suite passed)" if done.returncode == 0 else
                                               f"(pytest exit {done.returncode})")
            killed = done.returncode != 0
        except subprocess.TimeoutExpired:
            killer, killed = f"(timed out after {timeout:.0f} s)", True
        return {"mutant": mutant, "killed": killed, "by": killer, "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="only these mutants (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    args = p.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        p.error(f"unknown mutants: {', '.join(unknown)} (see --list)")
    chosen = [known[name] for name in args.names] or list(MUTANTS)
    if args.list:
        for m in chosen:
            print(f"{m.name:24} {m.path:14} {m.what}")
        return 0
    for m in chosen:  # every mutant must apply before minutes are spent on any
        mutated(m, ROOT)
    print("| mutant | file | the defect | killed by |\n|---|---|---|---|")
    survived = 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda m: run(m, args.timeout), chosen):
            m = result["mutant"]
            survived += not result["killed"]
            by = result["by"] if result["killed"] else "**survived**"
            print(f"| `{m.name}` | `{m.path}` | {m.what} | `{by}` |", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} mutants killed", file=sys.stderr)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
