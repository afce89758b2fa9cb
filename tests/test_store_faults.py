"""Fault injection on the draw store, with real processes and real files.

- Random SIGKILLs of a process sampling into a store (forked, so no import per process), each
  store then resumed; random single-byte corruptions of the files of a finished store, then
  read and resumed. Every outcome must be bitwise-equal estimates (against the uninterrupted
  run) or a one-line :class:`SusceptError`, never a silently different number. Counts:
  ``SUSCEPT_FAULTS="KILLS,CORRUPTIONS"`` (default ``6,40``; the small CI version).
- Two processes writing one store: the second is refused with the holder named, and the
  first's store stays intact.
"""

import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_store import assert_same_run, regression

import suscept
from suscept.errors import SusceptError
from suscept.integrity import StoreLockedError
from suscept.store import DrawStore

FORK = multiprocessing.get_context("fork")
META = {"test": "faults"}
# chain 1 diverges at step 26 (a partial block committed as its last record); 3 chains x 15
# commits of 4 draws; about 1 s of sampling
SETTINGS = dict(n_draws=60, n_blocks=15, step_size=3e-3, max_loss_rise=3.0)
LOCKED, REFUSED, FAILED = 3, 2, 1  # exit codes of a writer process


def counts() -> tuple[int, int]:
    kills, corruptions = os.environ.get("SUSCEPT_FAULTS", "6,40").split(",")
    return int(kills), int(corruptions)


def sample_into(folder: Path, resume: bool) -> suscept.Run:
    model, loss_fn, data, cfg, kwargs = regression(**SETTINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", suscept.DivergenceWarning)
        return suscept.sample(model, loss_fn, data, cfg,
                              store=DrawStore(folder, meta=META, resume=resume), **kwargs)


def writer(folder: Path, resume: bool, go=None) -> None:
    """A writer process: sample into ``folder``; the exit code says how it ended and the
    message goes to ``folder.parent / f"message-{pid}"``."""
    torch.set_num_threads(1)
    if go is not None:
        go.wait()
    code, message = 0, ""
    try:
        sample_into(folder, resume)
    except StoreLockedError as e:
        code, message = LOCKED, str(e)
    except SusceptError as e:
        code, message = REFUSED, str(e)
    except BaseException as e:  # noqa: BLE001 (reported to the test)
        code, message = FAILED, repr(e)
    (folder.parent / f"message-{os.getpid()}").write_text(message)
    os._exit(code)


def start(folder: Path, resume: bool, go=None):
    p = FORK.Process(target=writer, args=(folder, resume, go))
    p.start()
    return p


def message(folder: Path, p) -> str:
    f = folder.parent / f"message-{p.pid}"
    return f.read_text() if f.exists() else ""


class Reference:
    """The uninterrupted run, its store-backed BIF and stored draws."""

    def __init__(self, folder: Path):
        self.folder = folder
        t0 = time.perf_counter()
        self.run = sample_into(folder, resume=False)
        self.seconds = time.perf_counter() - t0
        store = DrawStore.open(folder)
        self.bif, self.draws = store.bif("loss", "q"), store.draws("q")
        assert [d.chain for d in self.run.divergences] == [1]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("faults") / "ref")


def outcome(folder: Path, ref: Reference) -> str:
    """'equal' (resume and readers give the reference bitwise), 'refused' (a one-line
    SusceptError), or 'different'."""
    try:
        run = sample_into(folder, resume=True)
        store = DrawStore.open(folder)
        est, draws = store.bif("loss", "q"), store.draws("q")
    except SusceptError as e:
        assert "\n" not in str(e) and len(str(e)) > 20, str(e)
        return "refused"
    try:
        assert_same_run(run, ref.run)
    except AssertionError:
        return "different"
    same = torch.equal(est.value, ref.bif.value) and torch.equal(est.stderr, ref.bif.stderr) \
        and torch.equal(draws.isnan(), ref.draws.isnan()) \
        and torch.equal(draws.nan_to_num(), ref.draws.nan_to_num())
    return "equal" if same else "different"


def kill_at_random(folder: Path, resume: bool, seconds: float, rng: random.Random) -> bool:
    """Start a writer, SIGKILL it after a random time; True if it was still running."""
    p = start(folder, resume)
    time.sleep(rng.uniform(0.0, seconds))
    alive = p.exitcode is None  # (reaps the process if it has ended)
    if alive:
        os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert alive or p.exitcode == 0, message(folder, p)
    return alive


def test_random_kills_then_resume_equal_uninterrupted(tmp_path, ref):
    kills, _ = counts()
    rng = random.Random(12)
    tally, interrupted = {"equal": 0, "refused": 0, "different": 0}, 0
    for i in range(kills):
        folder = tmp_path / f"kill{i}"
        interrupted += kill_at_random(folder, False, 1.3 * ref.seconds, rng)
        if rng.random() < 0.5:  # a resumed writer killed again
            kill_at_random(folder, True, ref.seconds, rng)
        tally[outcome(folder, ref)] += 1
        assert DrawStore(folder).holder() is None  # the killed writers left no lock
    print(f"SIGKILL outcomes over {kills} runs ({interrupted} killed mid-run): {tally}")
    assert tally["different"] == 0
    assert tally["refused"] == 0  # a kill never damages a store: every resume completes
    assert interrupted >= kills // 2


def corrupt_one_byte(folder: Path, rng: random.Random) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size)
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"{path.relative_to(folder)}@{at}"


def test_random_byte_corruptions_are_refused_or_harmless(tmp_path, ref):
    _, corruptions = counts()
    rng = random.Random(5)
    tally = {"equal": 0, "refused": 0, "different": 0}
    different = []
    shutil.copytree(ref.folder, tmp_path / "copy")
    assert outcome(tmp_path / "copy", ref) == "equal"  # a copy is a store (control)
    for i in range(corruptions):
        folder = tmp_path / f"c{i}"
        shutil.copytree(ref.folder, folder)
        where = corrupt_one_byte(folder, rng)
        result = outcome(folder, ref)
        tally[result] += 1
        if result == "different":
            different.append(where)
        shutil.rmtree(folder)
    print(f"single-byte corruption outcomes over {corruptions} stores: {tally}")
    assert not different, different
    assert tally["refused"] >= corruptions // 2  # most bytes matter: the check is not vacuous


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_second_writer_is_refused_and_first_store_stays_intact(tmp_path, ref):
    folder = tmp_path / "race"
    first = start(folder, False)
    wait_for(lambda: (folder / "progress").exists() and any((folder / "progress").iterdir()))
    os.kill(first.pid, signal.SIGSTOP)  # the first writer holds the lock, mid-run
    try:
        assert f"pid {first.pid} on {socket.gethostname()}" in DrawStore(folder).holder()
        second = start(folder, True)
        second.join()
        assert second.exitcode == LOCKED, message(folder, second)
        text = message(folder, second)
        assert f"pid {first.pid} on {socket.gethostname()}" in text and "wait" in text
        with pytest.raises(SusceptError, match=f"unfinished.*being written now by pid "
                                               f"{first.pid}"):
            DrawStore.open(folder).bif("loss", "q")  # a reader refuses a store in progress
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.join()
    assert first.exitcode == 0, message(folder, first)
    assert outcome(folder, ref) == "equal"

    # two writers started at the same moment into one new folder: one runs, one is refused
    folder, go = tmp_path / "together", FORK.Event()
    pair = [start(folder, True, go), start(folder, True, go)]
    go.set()
    for p in pair:
        p.join()
    assert sorted(p.exitcode for p in pair) == [0, LOCKED], [message(folder, p) for p in pair]
    assert outcome(folder, ref) == "equal"


def test_ctrl_c_waits_for_the_commit():
    """A SIGINT inside a commit is held until the commit has run, then raised as
    KeyboardInterrupt, and the handler is restored. Checked in a fresh interpreter, where
    SIGINT has Python's own handler (a test worker's signal state is the runner's)."""
    code = """
import signal
from suscept.integrity import deferred_interrupt
before, done = signal.getsignal(signal.SIGINT), []
try:
    with deferred_interrupt():
        signal.raise_signal(signal.SIGINT)  # handled before it returns: held here
        done.append("rest of the commit")
except KeyboardInterrupt:
    done.append("interrupted after")
assert done == ["rest of the commit", "interrupted after"], done
assert signal.getsignal(signal.SIGINT) is before
with deferred_interrupt():
    done.append("quiet")
print("ok", done)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, preexec_fn=plain_sigint)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def plain_sigint() -> None:
    """In a child before exec: SIGINT unblocked and at its default, as from a shell."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
