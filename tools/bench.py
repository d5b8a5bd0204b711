"""Training and sampling speed of the fast path against the plain path, measured side by side.

    python tools/bench.py                                   # T=500, n_feat=128, batch 256, default device
    python tools/bench.py --device cpu --preset cpu --ablate --compile --sample-n 100   # the CPU preset
    python tools/bench.py --device cpu --batch-size 128 --train-steps 4 --warmup 1 --sample-n 100 --ablate
    python tools/bench.py --device cpu --preset cpu --no-amp --profile      # where a CPU training step's time goes

Both paths run the very code ``train.py`` runs (``lib.training.train_step`` over ``lib.data.batches``) on random
uint8 digits, and sample with the default sampler (``--sampler`` to change it): the plain path is fp32, eager,
the loss read back every step; the fast path is ``lib.speed.default_speed(device)`` (in fp32
with ``--no-amp``). FLOPs are counted once with ``torch.utils.flop_counter`` (a training step is counted as
forward + backward of the network). ``--profile`` instead times the fast path's training step op by op
(``torch.profiler``, CPU only) and says what share of it the convolutions take and at what rate they run.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import replace
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lib.checkpoint import build_ddpm  # noqa: E402
from lib.cli import ArgumentParser, non_negative_float, pick_device, positive_int, run_cli  # noqa: E402
from lib.config import PRESETS, Config  # noqa: E402
from lib.data import batches  # noqa: E402
from lib.distributed import Replicas  # noqa: E402
from lib.errors import UsageError  # noqa: E402
from lib.optimizers import make_optimizer  # noqa: E402
from lib.samplers import DEFAULT_SAMPLER, SAMPLERS, Sampling, generate, quadratic_timesteps  # noqa: E402
from lib.speed import PLAIN, Speed, autocast, default_speed, prepare_model, prepare_process  # noqa: E402
from lib.training import TrainState, train_step  # noqa: E402


def config_for(args: Any) -> Config:
    """``--preset``'s configuration with ``--T``, ``--n-feat`` and ``--batch-size`` where given."""
    given = {"T": args.T, "n_feat": args.n_feat, "batch_size": args.batch_size}
    return PRESETS[args.preset].override(**{k: v for k, v in given.items() if v is not None})


def training_flops(config: Config, batch: int) -> tuple[int, int]:
    """FLOPs of one forward pass per image, and of one training step (forward + backward) per image."""
    forward, step = step_flops(config, batch)
    return forward, sum(step.values())


def step_flops(config: Config, batch: int) -> tuple[int, dict[Any, int]]:
    """FLOPs per image of one forward pass, and of one training step by op (forward + backward)."""
    ddpm = build_ddpm(config)
    model = ddpm.model
    x, t = torch.randn(batch, *ddpm.image_shape), torch.randint(0, config.diffusion.T, (batch,))
    y = torch.randint(0, config.model.n_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    forward = counter.get_total_flops() // batch
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).square().mean().backward()
    return forward, {op: n // batch for op, n in counter.get_flop_counts()["Global"].items()}


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS so far)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(config: Config, speed: Speed, device: torch.device, steps: int, warmup: int,
                  timed: AbstractContextManager | None = None) -> float:
    """Training images per second over ``steps`` steps after ``warmup`` steps, run inside ``timed`` if given
    (a profiler, say)."""
    torch.manual_seed(0)
    batch = config.training.batch_size
    n = batch * (steps + warmup)
    ddpm = build_ddpm(config).to(device)
    images = torch.randint(0, 256, (n, *ddpm.image_shape[1:]), dtype=torch.uint8).to(device)
    labels = torch.randint(0, config.model.n_classes, (n,)).to(device)
    ema = build_ddpm(config).model.to(device).requires_grad_(False)
    prepare_process(speed)
    prepare_model(ddpm.model, speed)
    run = config.training
    optimizer = make_optimizer(ddpm.model, run.lr, speed, run.optimizer)
    state = TrainState(ddpm, ema, optimizer, Replicas(ddpm), speed)
    noise = torch.Generator(device=device).manual_seed(0)
    pending = []
    started = 0.0
    with ExitStack() as stack:
        for i, (x, y) in enumerate(batches(images, labels, batch, torch.Generator())):
            if i == warmup:
                sync(device)
                stack.enter_context(timed or nullcontext())
                started = time.perf_counter()
            draws = ddpm.draw_training_noise(len(x), ddpm.image_shape, device, noise)
            pending.append(train_step(state, x, y, draws, 0.995))
            if len(pending) == speed.log_every:
                torch.stack(pending).tolist()
                pending.clear()
        torch.stack(pending).tolist() if pending else None
        sync(device)
        elapsed = time.perf_counter() - started
    return steps * batch / elapsed


def convolution_flops(config: Config, batch: int) -> int:
    """FLOPs of the network's convolutions (forward and backward) in one training step, per image."""
    return sum(n for op, n in step_flops(config, batch)[1].items() if "convolution" in str(op))


def profile_training(args: Any) -> None:
    """The fast path's training step op by op: the ten costliest ops, and the convolutions' share and rate."""
    device = pick_device(args.device)
    prof = profile(activities=[ProfilerActivity.CPU])  # entered after the warm-up steps, so only timed steps count
    images_per_s = time_training(args.config, fast_path(device, args), device, args.train_steps, args.warmup, prof)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6  # seconds
    print(f"\n| op (fast path, {args.train_steps} steps) | calls | self CPU time | share |\n|---|---|---|---|")
    for e in ops[:10]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"| {e.key} | {e.count} | {seconds:.3f} s | {100 * seconds / total:.1f}% |")
    conv = sum(e.self_cpu_time_total for e in ops if "onvolution" in e.key) / 1e6  # ConvolutionBackward0 too
    flops = convolution_flops(args.config, 4) * args.batch_size * args.train_steps
    print(f"\nconvolutions, forward and backward: {100 * conv / total:.1f}% of the profiled time, "
          f"{flops / conv / 1e9:.1f} GFLOP/s; {images_per_s:.1f} images/s while profiled")
    print(f"with every other op free, a step would take {conv / args.train_steps * 1e3:.0f} ms: "
          f"{args.train_steps * args.batch_size / conv:.1f} images/s")


def time_sampling(config: Config, speed: Speed, device: torch.device, n: int, how: Sampling) -> float:
    """Digits per second for ``n`` digits drawn as ``how`` says (bf16 when ``speed.amp``), in one batch."""
    ddpm = build_ddpm(config).to(device).eval()
    labels = torch.arange(n) % config.model.n_classes
    with autocast(device, speed):
        generate(ddpm, labels[:2], Sampling(how.sampler, 2 if SAMPLERS[how.sampler].steps else None), batch_size=n)
        sync(device)
        started = time.perf_counter()
        generate(ddpm, labels, how, seed=0, batch_size=n)
        sync(device)
    return n / (time.perf_counter() - started)


def network_passes(config: Config, how: Sampling) -> int:
    """Batches the network runs to draw as ``how`` says: two at each step where guidance applies, else one."""
    ddpm, how = build_ddpm(config), how.resolve(config.diffusion.T)
    steps = range(ddpm.T) if SAMPLERS[how.sampler].steps is None else quadratic_timesteps(ddpm.T, how.steps)
    if how.guidance in (0.0, 1.0):  # DDPM.guided_eps: one pass, unconditional or conditional
        return len(steps)
    inside = [how.interval is None or how.guidance < 1 or how.interval[0] < s <= how.interval[1]
              for s in ddpm.sigmas.tolist()]
    return sum(2 if inside[t] else 1 for t in steps)


def sampling_passes(args: Any) -> tuple[int, int]:
    """:func:`network_passes` of the timed sampling, and of the ancestral sampler over all T steps."""
    how = sampling(args)
    full = replace(how, sampler="ddpm", steps=None, eta=None).resolve(args.T)
    return network_passes(args.config, how), network_passes(args.config, full)


def fast_path(device: torch.device, args: Any) -> Speed:
    """The device's fast path, in fp32 with ``--no-amp`` (what runs on CPUs without bf16 units)."""
    return default_speed(device, amp=False if args.no_amp else None)


def describe(args: Any) -> int:
    """Print the device, the network and its FLOPs; return the FLOPs per image per training step."""
    device = pick_device(args.device)
    forward, step = training_flops(args.config, 4)
    print(f"device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"), torch {torch.__version__}, {torch.get_num_threads()} threads; preset {args.preset}, "
          + f"T={args.T} n_feat={args.n_feat} batch {args.batch_size}")
    print(f"network: {forward / 1e9:.2f} GFLOP per image forward, {step / 1e9:.2f} GFLOP per image per training step")
    return step


def run(args: Any, step: int) -> list[dict[str, Any]]:
    """Both paths timed; ``step`` is the FLOPs per image per training step (:func:`describe`)."""
    device = pick_device(args.device)
    config = args.config
    how = sampling(args)
    few_passes, all_passes = sampling_passes(args)
    rows = []
    for name, speed in (("plain", PLAIN), ("fast", fast_path(device, args))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        images_per_s = time_training(config, speed, device, args.train_steps, args.warmup)
        digits_per_s = time_sampling(config, speed, device, args.sample_n, how)
        rows.append({"path": name, "speed": speed, "images_per_s": images_per_s,
                     "epoch_s": 60000 / images_per_s, "tflops": images_per_s * step / 1e12,
                     "digits_per_s": digits_per_s,
                     "digits_per_s_full": digits_per_s * few_passes / all_passes, "passes": (few_passes, all_passes),
                     "memory": peak_memory(device)})
        print(f"{name}: {speed}", flush=True)
    return rows


def ablate(args: Any) -> None:
    """Training speed of the fast path with one part of it turned off at a time."""
    device = pick_device(args.device)
    config = args.config
    fast = fast_path(device, args)
    layout = [] if fast.channels_last else [("fast path + channels_last", replace(fast, channels_last=True))]
    variants = [("fast path", fast)] + [
        (f"without {name}", replace(fast, **{name: value}))
        for name, value in (("amp", False), ("channels_last", False), ("fused_optimizer", False),
                            ("log_every", 1), ("keep_freed_memory", False))
        if getattr(fast, name) != value
    ] + layout + [("plain path", PLAIN)]
    variants += [("fast path + torch.compile", replace(fast, compile=True))] if args.compile else []
    # the allocator's setting is process-wide and stays once made: time the variants without it first
    variants.sort(key=lambda variant: variant[1].keep_freed_memory)
    print("\n| training | images/s |\n|---|---|")
    for name, speed in variants:
        print(f"| {name} | {time_training(config, speed, device, args.train_steps, args.warmup):.1f} |", flush=True)


def sampling(args: Any) -> Sampling:
    """How the sampling timing draws: ``--sampler`` with ``--sample-steps`` (default: the sampler's own)."""
    return Sampling(args.sampler, args.sample_steps, guidance=args.guidance).resolve(args.T)


def report(rows: list[dict[str, Any]], args: Any) -> None:
    how = sampling(args)
    print(f"\n| path | train images/s | s per 60k-image epoch | train TFLOP/s | digits/s, {how.describe()} "
          f"| digits/s, all {args.T} steps (est.) | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['images_per_s']:.1f} | {r['epoch_s']:.0f} | {r['tflops']:.3f} | "
              f"{r['digits_per_s']:.1f} | {r['digits_per_s_full']:.2f} | {r['memory']} |")
    plain, fast = rows
    print(f"\nfast / plain: training {fast['images_per_s'] / plain['images_per_s']:.2f}x, "
          f"sampling {fast['digits_per_s'] / plain['digits_per_s']:.2f}x")
    if args.ablate and fast["speed"].keep_freed_memory:
        print("(after --ablate the plain path too ran with freed memory kept: that setting is process-wide; "
              "the ablation's 'without keep_freed_memory' row times it off)")
    few_passes, all_passes = fast["passes"]
    print(f"(sampling: guidance {args.guidance}, where it applies conditional and unconditional passes in one "
          f"batch of {2 * args.sample_n}; the all-steps figure is the {how.steps}-step rate scaled by the network "
          f"passes of each, {few_passes} against {all_passes})")


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog="bench.py", description="Fast path against plain path: training and sampling speed.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="train.py preset whose network and batch are timed (default: default)")
    p.add_argument("--T", type=positive_int, help="diffusion steps (default: the preset's)")
    p.add_argument("--n-feat", type=positive_int, help="UNet width (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default: the preset's)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's own choice)")
    p.add_argument("--train-steps", type=positive_int, default=20, help="timed training steps per path")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps first")
    p.add_argument("--sample-n", type=positive_int, default=1000, help="digits sampled per timing")
    p.add_argument("--sampler", choices=[name for name, info in SAMPLERS.items() if info.steps],
                   default=DEFAULT_SAMPLER,
                   help=f"the sampler timed (default {DEFAULT_SAMPLER})")
    p.add_argument("--sample-steps", type=positive_int, help="its steps (default: the sampler's own)")
    p.add_argument("--guidance", type=non_negative_float, default=2.0)
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--no-amp", action="store_true", help="time the fast path in fp32, as on CPUs without bf16 units")
    p.add_argument("--ablate", action="store_true", help="also time training with each fast-path part off")
    p.add_argument("--compile", action="store_true", help="with --ablate: also time the fast path compiled")
    p.add_argument("--profile", action="store_true",
                   help="instead: time the fast path's training step op by op (CPU only; --train-steps steps)")
    args = p.parse_args(argv)
    if args.profile and pick_device(args.device).type != "cpu":
        raise UsageError("--profile times CPU ops only; pass --device cpu")
    args.config = config_for(args)
    flat = args.config.flat()
    args.T, args.n_feat, args.batch_size = flat["T"], flat["n_feat"], flat["batch_size"]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        step = describe(args)
        if args.profile:
            profile_training(args)
            return 0
        if args.ablate:  # first: the allocator's setting, once made, stays for the whole process
            ablate(args)
        report(run(args, step), args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a longer-lived process (the tests)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("bench.py", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
