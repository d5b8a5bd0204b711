"""Fault injection: kill -9 at random moments, SIGINT and SIGTERM inside an epoch, divergence, a second run on
the same files, a full disk, damaged data and a checkpoint that would run code when loaded.

The subprocess tests run ``train.py`` with one thread each, as a user would; the reference is a run of the
same command that nothing interrupted.
"""

from __future__ import annotations

import errno
import os
import random
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

from lib import checkpoint
from lib import fileio
import sample
import train
from lib import training
from lib.errors import UsageError
from conftest import TINY_TRAIN, one_line_error, write_fake_mnist, write_idx
from lib.errors import RunFailed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30  # 480 fake images in batches of 16: room for a signal to land inside an epoch
FLAGS = TINY_TRAIN + ["--plain"]  # the plain path reads the loss back, and moves the progress bar, every step
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INTERRUPTED = re.compile(r"^interrupted at epoch (\d+), step (\d+) of (\d+); checkpoint saved; "
                         r"continue with --resume$")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_fake_mnist(str(tmp_path_factory.mktemp("faults") / "data"), n_train=16 * STEPS)


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left():
    """Kill what a failed test left running."""
    yield
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    STARTED.clear()


class Run:
    """``train.py`` in its own process, its stderr in a file that the test reads while it runs."""

    def __init__(self, data: str, out: str, *extra: str) -> None:
        self.out, self.err = out, f"{out}.{time.monotonic_ns()}.err"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FLAGS, "--data-root",
                                          data, "--out-dir", out, *extra], cwd=os.path.dirname(out),
                                         stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        STARTED.append(self.proc)

    def stderr(self) -> str:
        return read_text(self.err)

    def wait_for(self, pattern: str, timeout: float = 120, required: bool = True) -> re.Match | None:
        """The first match of ``pattern`` in stderr; ``None`` if the process ends first, or (not ``required``)
        when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self.proc.poll() is not None
            found = re.search(pattern, self.stderr())
            if found or ended:
                return found
            time.sleep(0.005)
        assert not required, f"no {pattern!r} after {timeout}s: {self.stderr()[-1000:]}"
        return None

    def wait(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def checkpoint(self) -> str:
        return checkpoint.checkpoint_path(self.out, "8_8")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """The uninterrupted run, and the seconds it took to start (to print its first line)."""
    launched, run = time.monotonic(), Run(data, str(tmp_path_factory.mktemp("reference") / "out"))
    assert run.wait_for("training on")
    start = time.monotonic() - launched
    assert run.wait() == 0, run.stderr()[-2000:]
    return {"ckpt": torch.load(run.checkpoint, weights_only=True), "start": start}


def assert_same_run(ckpt: dict, reference: dict) -> None:
    """Bit for bit: the loss of every step, the network, its EMA and the optimizer's moments."""
    assert ckpt["epoch"] == reference["epoch"] and ckpt["step"] == 0
    assert ckpt["losses"] == reference["losses"]
    for part in ("model", "ema"):
        for key, value in reference[part].items():
            assert torch.equal(ckpt[part][key], value), (part, key)
    for index, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(ckpt["optimizer"]["state"][index][key], value), (index, key)


def leftovers(out: str) -> list[str]:
    """Temp files and probes of a writer that was cut short, anywhere under ``out``."""
    return [os.path.join(base, f) for base, _, files in os.walk(out) for f in files
            if f.startswith((fileio.TEMP_PREFIX, ".write-test-"))]


def wait_for_kill_moment(run: Run, rng: random.Random, kind: int, done: int, start_up: float) -> None:
    """Wait for a seeded random moment of ``run``, which resumes after ``done`` epochs of 2.

    ``kind`` 0: during start-up (imports, data, lock, clean-up); 1: inside a step of the epoch it starts in;
    2: inside the write of epoch 1's grid, loss plot or checkpoint; 3: inside a step of epoch 2. The last
    epoch is never let finish, so that the loop makes all its kills.
    """
    if kind == 0:
        run.wait_for("training on", rng.uniform(0.3, 1.0) * start_up, required=False)
        return
    assert run.wait_for("training on"), run.stderr()[-2000:]
    if kind == 2 and done == 0:
        inside_write(run, rng.choice(["samples_epoch1_", "loss_plot_", "ddpm_8_8-"]))
        return
    epoch = 2 if kind == 3 else done + 1
    assert run.wait_for(rf"epoch {epoch}/2: .*\| {rng.randint(1, STEPS - 5)}/{STEPS}"), run.stderr()[-2000:]
    time.sleep(rng.uniform(0, 0.05))  # a step takes about that long


def inside_write(run: Run, name: str) -> None:
    """Wait until the temp file of ``name`` (a file name's start) exists: the run is writing that file.

    Gives up when epoch 2 starts (the write was too quick to be seen).
    """
    folders = [run.out, os.path.join(run.out, "checkpoints"), os.path.join(run.out, "DDMP_generated_samples_8_8")]
    while run.proc.poll() is None:
        for folder in folders:
            if os.path.isdir(folder) and any(f.startswith(fileio.TEMP_PREFIX + name) for f in os.listdir(folder)):
                return
        if "epoch 2/2" in run.stderr():
            return
        time.sleep(0.0005)


def test_kill_9_at_random_moments_loses_nothing(data, reference, tmp_path):
    """SIGKILL at seeded random moments, each followed by a restart (``--resume`` once a checkpoint exists).

    After every kill the checkpoint, if any, loads; the next run removes a temp file the kill left and takes
    over its lock; the end is the uninterrupted run.
    """
    rng, out = random.Random(15), str(tmp_path / "out")
    path, lock = checkpoint.checkpoint_path(out, "8_8"), os.path.join(out, "checkpoints", "ddpm_8_8.lock")
    kills, loaded, temps, holder, left = 0, 0, 0, "", []
    while kills < 8:
        done = torch.load(path, weights_only=True)["epoch"] if os.path.exists(path) else 0
        run = Run(data, out, *(["--resume"] if os.path.exists(path) else []))
        wait_for_kill_moment(run, rng, kills % 4, done, reference["start"])
        if "training on" in run.stderr():  # it took over the killed run's lock and removed its temp files
            assert "taking over the lock" in run.stderr() or not holder
            assert "temporary file(s) that a killed run left" in run.stderr() or not left
        run.proc.kill()
        assert run.wait() == -signal.SIGKILL, run.stderr()[-2000:]
        kills, left = kills + 1, [f for f in leftovers(out) if os.path.basename(f).startswith(fileio.TEMP_PREFIX)]
        temps += len(left)
        holder = read_text(lock) if os.path.exists(lock) else ""
        if os.path.exists(path):
            torch.load(path, weights_only=True)
            checkpoint.load_checkpoint(path)
            loaded += 1
    last = Run(data, out, *(["--resume"] if os.path.exists(path) else []))
    assert last.wait() == 0, last.stderr()[-2000:]
    print(f"kill -9 loop: {kills} kills, {loaded} checkpoints loaded after them, {temps} temp files left "
          "by a kill (removed by the next run)")
    assert loaded >= 4 and leftovers(out) == [] and not os.path.exists(lock)
    assert_same_run(torch.load(last.checkpoint, weights_only=True), reference["ckpt"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_an_epoch_saves_it_and_resume_ends_as_the_uninterrupted_run(data, reference, tmp_path,
                                                                                   signum):
    run = Run(data, str(tmp_path / "out"))
    assert run.wait_for(rf"epoch 1/2: +\d+%\|[^|]*\| ([3-9]|1\d)/{STEPS}"), run.stderr()[-2000:]
    run.proc.send_signal(signum)
    assert run.wait() == 128 + signum
    lines = run.stderr().strip().splitlines()
    stopped = INTERRUPTED.match(lines[-1])
    assert stopped and "Traceback" not in run.stderr(), lines[-3:]
    assert sum(bool(INTERRUPTED.match(line)) for line in lines) == 1 and "error" not in run.stderr()
    epoch, step, of = map(int, stopped.groups())
    assert epoch == 1 and 3 <= step < of == STEPS
    ckpt = checkpoint.load_checkpoint(run.checkpoint)
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["losses"])) == (0, step, step)
    assert ckpt["losses"] == reference["ckpt"]["losses"][:step]
    resumed = Run(data, run.out, "--resume")
    assert resumed.wait() == 0, resumed.stderr()[-2000:]
    assert f"(epoch 1 from step {step + 1} of {STEPS})" in resumed.stderr()
    assert_same_run(torch.load(resumed.checkpoint, weights_only=True), reference["ckpt"])


def test_a_second_run_on_the_same_files_is_refused(data, tmp_path, capsys):
    first = Run(data, str(tmp_path / "out"))
    assert first.wait_for("training on")
    assert train.main(FLAGS + ["--data-root", data, "--out-dir", first.out, "--overwrite"]) == 2
    err = one_line_error(capsys)
    assert f"is being trained by process {first.proc.pid} " in err and "choose another --out-dir" in err
    assert first.proc.poll() is None  # the first run goes on


def last_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_a_second_ctrl_c_while_saving_does_not_break_the_checkpoint(fake_mnist, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 2, and again while that checkpoint is being written: it is written whole."""
    real_step, real_save, steps = training.train_step, torch.save, []

    def step_then_ctrl_c(*args, **kwargs):
        steps.append(1)
        loss = real_step(*args, **kwargs)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    def ctrl_c_then_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, in the middle of the save
        real_save(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    monkeypatch.setattr(torch, "save", ctrl_c_then_save)
    out, before = str(tmp_path / "out"), signal.getsignal(signal.SIGINT)
    assert train.main(TINY_TRAIN + ["--data-root", fake_mnist, "--out-dir", out]) == 130
    assert last_line(capsys) == "interrupted at epoch 1, step 2 of 4; checkpoint saved; continue with --resume"
    ckpt = checkpoint.load_checkpoint(checkpoint.checkpoint_path(out, "8_8"))
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["losses"])) == (0, 2, 2) and leftovers(out) == []
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C works as usual again


def all_finite(ckpt: dict) -> bool:
    tensors = [*ckpt["model"].values(), *ckpt["ema"].values(),
               *(t for s in ckpt["optimizer"]["state"].values() for t in s.values())]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_an_absurd_learning_rate_stops_the_run_and_saves_nothing(fake_mnist, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert train.main(TINY_TRAIN + ["--data-root", fake_mnist, "--out-dir", out, "--lr", "1e30"]) == 1
    err = last_line(capsys)
    assert re.search(r"training diverged: loss (nan|inf) at epoch 1, step \d of 4;", err), err
    assert "a lower --lr than 1e+30" in err
    assert not os.path.exists(checkpoint.checkpoint_path(out, "8_8")) and leftovers(out) == []


@pytest.mark.parametrize("poisoned, words", [
    (6, "loss nan at epoch 2, step 3 of 4"),  # found in the next step's loss
    (8, "NaN or infinite weights at epoch 2, step 4 of 4"),  # the last step: found in the weights before saving
])
def test_nan_weights_stop_the_run_and_the_last_good_checkpoint_stays(fake_mnist, tmp_path, monkeypatch, capsys,
                                                                     poisoned, words):
    out, real_step, steps, kept = str(tmp_path / "out"), training.train_step, [], {}
    path = checkpoint.checkpoint_path(out, "8_8")

    def step_then_poison(state, *args, **kwargs):
        loss = real_step(state, *args, **kwargs)
        steps.append(1)
        if len(steps) == poisoned:
            next(state.ddpm.model.parameters()).data.fill_(float("nan"))
            with open(path, "rb") as f:
                kept["bytes"] = f.read()
        return loss

    monkeypatch.setattr(training, "train_step", step_then_poison)
    assert train.main(TINY_TRAIN + ["--data-root", fake_mnist, "--out-dir", out]) == 1
    err = last_line(capsys)
    assert words in err and "--lr" in err
    with open(path, "rb") as f:
        assert f.read() == kept["bytes"]
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["epoch"] == 1 and all_finite(ckpt) and leftovers(out) == []
    assert not os.path.exists(os.path.join(out, "DDMP_generated_samples_8_8", "samples_epoch2_8_8.png"))


def sizes(out: str) -> dict[str, int]:
    """The sizes of the files a tiny run wrote: its grids, loss plot and checkpoint."""
    grids = os.path.join(out, "DDMP_generated_samples_8_8")
    return {"grid": min(os.path.getsize(os.path.join(grids, f)) for f in os.listdir(grids)),
            "plot": os.path.getsize(os.path.join(out, "loss_plot_8_8.png")),
            "checkpoint": os.path.getsize(checkpoint.checkpoint_path(out, "8_8"))}


def file_size_limit(limit: int):
    """For a child process: files may grow to ``limit`` bytes, and a write past it fails with EFBIG (``File too
    large``) instead of killing the process (SIGXFSZ ignored), as a full disk fails a write with ENOSPC."""

    def limit_the_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_the_child


@pytest.mark.parametrize("victim", ["grid", "checkpoint"])
def test_a_real_write_failure_ends_in_one_line_and_keeps_the_last_checkpoint(trained_run, tmp_path, victim):
    """A run over a finished one (``--overwrite``) in a process whose files cannot grow past a limit: below the
    first grid's size, or between the pictures' sizes and the checkpoint's. The write fails in the real writers
    (PIL's, torch's serialisation), and the run ends with one line and status 1, the old checkpoint whole."""
    out, data = str(tmp_path / "out"), trained_run["data"]
    shutil.copytree(trained_run["out"], out)
    path, size = checkpoint.checkpoint_path(out, "8_8"), sizes(out)
    assert size["checkpoint"] > 2 * max(size["grid"], size["plot"])  # room for a limit between them
    limit = size["grid"] // 2 if victim == "grid" else (max(size["grid"], size["plot"]) + size["checkpoint"]) // 2
    kept = open(path, "rb").read()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY_TRAIN, "--data-root", data,
                           "--out-dir", out, "--overwrite"], capture_output=True, text=True, timeout=300,
                          env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=file_size_limit(limit))
    failed = os.path.join(out, "DDMP_generated_samples_8_8", "samples_epoch1_8_8.png") if victim == "grid" else path
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and done.stderr.count("error") == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"train.py: error: cannot write {failed!r}: File too large"
    assert open(path, "rb").read() == kept and checkpoint.load_checkpoint(path)["epoch"] == 2
    assert leftovers(out) == [] and not os.path.exists(os.path.join(out, "checkpoints", "ddpm_8_8.lock"))


def one_line_after_progress(capsys) -> str:
    """The last line of stderr, after checking that it is the only error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err.strip().splitlines()[-1]


def damage(raw: str, how: str) -> str:
    """Damage one file of a fake MNIST's training split; returns its path."""
    images, labels = os.path.join(raw, "train-images-idx3-ubyte"), os.path.join(raw, "train-labels-idx1-ubyte")
    if how == "truncated":
        with open(images, "r+b") as f:
            f.truncate(os.path.getsize(images) - 100)
        return images
    if how == "images named as labels":
        with open(images, "rb") as src, open(labels, "wb") as dst:
            dst.write(src.read())
        return labels
    import numpy as np

    write_idx(labels, (np.arange(64) % 13).astype(np.uint8))  # labels 10, 11, 12: not digits
    return labels


@pytest.mark.parametrize("how, words", [("truncated", "is truncated"),
                                        ("images named as labels", "is not an IDX file of 1-dimensional"),
                                        ("labels past 9", "holds label 12, MNIST has 10 classes")])
def test_damaged_data_is_one_line_naming_the_file(tmp_path, capsys, how, words):
    data = write_fake_mnist(str(tmp_path / "data"))
    damaged = damage(os.path.join(data, "MNIST", "raw"), how)
    assert train.main(TINY_TRAIN + ["--data-root", data, "--out-dir", str(tmp_path / "out")]) == 2
    err = one_line_error(capsys)
    assert repr(damaged) in err and words in err
    assert not os.path.exists(tmp_path / "out")


class RunsCode:
    """Pickles as a call that writes ``marker``: what a hostile "checkpoint" could carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_checkpoint_that_would_run_code_is_refused_unread(trained_run, tmp_path, capsys):
    path, marker = str(tmp_path / "ddpm_8_8.pt"), str(tmp_path / "marker")
    ckpt = torch.load(trained_run["checkpoint"], weights_only=True)
    torch.save({**ckpt, "extra": RunsCode(marker)}, path)
    assert sample.main(["--checkpoint", path, "--out", str(tmp_path / "x.png")]) == 2
    err = one_line_error(capsys)
    assert "is not a checkpoint this project wrote" in err and "weights_only" not in err
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the payload is real: loaded the unsafe way, it runs
    assert os.path.exists(marker)


def test_atomic_write_is_durable_and_leaves_the_umask_alone(tmp_path, monkeypatch):
    mask = os.umask(0o027)
    os.umask(mask | 0o027)
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("atomic_write changed the umask"))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    try:
        target = str(tmp_path / "x.bin")
        fileio.atomic_write(target, lambda tmp: fileio.write_bytes(tmp, b"new"))
    finally:
        monkeypatch.undo()
        os.umask(mask)
    with open(target, "rb") as f:
        assert f.read() == b"new"
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~(mask | 0o027)
    assert synced == [False, True]  # the file, then its folder


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = str(tmp_path / "x.bin")
    fileio.atomic_write(target, lambda tmp: fileio.write_bytes(tmp, b"old"))

    def half_then_full(tmp: str) -> None:
        fileio.write_bytes(tmp, b"ne")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(RunFailed, match=re.escape(f"cannot write {target!r}: No space left on device")):
        fileio.atomic_write(target, half_then_full)
    assert os.listdir(tmp_path) == ["x.bin"]
    with open(target, "rb") as f:
        assert f.read() == b"old"


def test_stale_temps_of_this_configuration_only_are_removed(tmp_path):
    ours = [tmp_path / ".tmp-ddpm_8_8-0123abcd.pt", tmp_path / ".tmp-samples_epoch3_8_8-ff00.png"]
    theirs = [tmp_path / ".tmp-ddpm_8_16-0123abcd.pt", tmp_path / "ddpm_8_8.pt"]
    for path in ours + theirs:
        path.write_bytes(b"x")
    removed = fileio.remove_stale_temps([str(tmp_path / "ddpm_8_8.pt"), str(tmp_path / "samples_epoch*_8_8.png")])
    assert sorted(removed) == sorted(map(str, ours))
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in theirs)


def test_a_lock_is_refused_while_held_and_taken_over_when_its_holder_is_gone(tmp_path, monkeypatch, capsys):
    lock = str(tmp_path / "run.lock")
    with fileio.exclusive(lock, "'run'"):
        with pytest.raises(UsageError, match=f"'run' is being trained by process {os.getpid()} "):
            with fileio.exclusive(lock, "'run'"):
                pass
    assert not os.path.exists(lock)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=60)
    for locks in (fileio.fcntl, None):  # with flock, and with the holder's pid alone (no fcntl)
        monkeypatch.setattr(fileio, "fcntl", locks)
        with open(lock, "w") as f:
            f.write(f"{gone.stdout.strip()} {socket.gethostname()}\n")
        with fileio.exclusive(lock, "'run'"):
            with open(lock) as f:
                assert f.read().split()[0] == str(os.getpid())
        assert "taking over the lock" in capsys.readouterr().err
    with open(lock, "w") as f:  # no fcntl, and a holder that is alive: refused
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    with pytest.raises(UsageError, match="is being trained by process"):
        with fileio.exclusive(lock, "'run'"):
            pass
