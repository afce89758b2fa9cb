"""``suscept run`` with real files and processes: a resume whose inputs changed is refused,
files the run did not write are never touched, a failed start does not lock its folder,
every realistic mistake ends in one line and exit status 2, Ctrl-C in 130 with the resume
hint, and a second process is refused while the first holds the folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from suscept import cli
from suscept import config as config_mod
from suscept.estimate import Estimate
from suscept.folder import RunFolder

pytest.importorskip("transformer_lens")
import observables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=16, n_ctx=8)


def toml(tmp_path, data_path, ck_path, *, extra="", draws=4, chains=1) -> Path:
    """A tiny run on a token file and a checkpoint: one layer, 16 sequences of 8 tokens."""
    text = "[model]\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items()) + (
        f'checkpoint = "{ck_path}"\n[data]\nkind = "tokens"\npath = "{data_path}"\n'
        "n_probe = 4\nn_query = 2\n[observables]\ncomponents = []\ntoken_loss = false\n"
        f"[sampler]\nstep_size = 1e-3\nn_beta = 10.0\ngamma = 100.0\nn_chains = {chains}\n"
        f'n_draws = {draws}\nn_blocks = 2\n[estimators]\nwanted = ["llc"]\n') + extra
    path = tmp_path / f"run{len(list(tmp_path.glob('run*.toml')))}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def inputs(tmp_path):
    """(config, tokens file, checkpoint file, other weights, other tokens)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (16, 8), generator=gen)
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.save(observables.build(**MODEL, seed=1).state_dict(), tmp_path / "ck.pt")
    other_w = observables.build(**MODEL, seed=2).state_dict()
    other_t = torch.randint(0, 16, (16, 8), generator=gen)
    return toml(tmp_path, tmp_path / "tokens.pt", tmp_path / "ck.pt"), other_w, other_t


def run_main(*args) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["run", *map(str, args), "--no-progress"])
    return code, err.getvalue()


def test_resume_with_changed_checkpoint_or_tokens_is_refused(tmp_path, inputs, capsys):
    cfg, other_w, other_t = inputs
    out = tmp_path / "out"
    state = torch.get_rng_state()
    assert run_main(cfg, "--out", out)[0] == 0
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    llc = (out / "estimates" / "llc.pt").read_bytes()
    saved = {p: p.read_bytes() for p in (tmp_path / "ck.pt", tmp_path / "tokens.pt")}

    torch.save(other_w, tmp_path / "ck.pt")  # other weights under the same name
    code, err = run_main(cfg, "--out", out, "--resume")
    assert code == 2 and "checkpoint file" in err and "ck.pt" in err and "Restore" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "ck.pt").write_bytes(saved[tmp_path / "ck.pt"])

    torch.save(other_t, tmp_path / "tokens.pt")
    code, err = run_main(cfg, "--out", out, "--resume")
    assert code == 2 and "token file" in err and "tokens.pt" in err
    torch.save(other_t.float(), tmp_path / "tokens.pt")  # and floats are refused outright
    code, err = run_main(cfg, "--out", out, "--resume")
    assert code == 2 and "integer" in err
    (tmp_path / "tokens.pt").write_bytes(saved[tmp_path / "tokens.pt"])

    assert run_main(cfg, "--out", out, "--resume")[0] == 0  # the same inputs: allowed
    assert (out / "estimates" / "llc.pt").read_bytes() == llc
    inputs_json = json.loads((out / "inputs.json").read_text())
    assert len(inputs_json["checkpoint_sha256"]) == 64 and len(inputs_json["anchor_loss"]) == 4
    capsys.readouterr()


def test_files_the_run_did_not_write_are_never_touched(tmp_path, inputs, capsys):
    cfg, _, _ = inputs
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = run_main(cfg, "--out", foreign)
    assert code == 2 and "not a suscept run folder" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "out"
    cfg2 = toml(tmp_path, tmp_path / "tokens.pt", tmp_path / "ck.pt",
                extra='[output]\nstore = false\n')
    assert run_main(cfg2, "--out", out)[0] == 0
    mine = Estimate(torch.ones(2), torch.zeros(2), ("sample",), "mine", "my own")
    mine.save(out / "estimates" / "mine.pt")  # the user's own estimate beside the run's
    kept = (out / "estimates" / "mine.pt").read_bytes()
    (out / "notes.txt").write_text("mine")
    lk = toml(tmp_path, tmp_path / "tokens.pt", tmp_path / "ck.pt",
              extra='[output]\nstore = false\n[estimators]\nwanted = ["loss_kernel"]\n')
    lk.write_text(lk.read_text().replace('[estimators]\nwanted = ["llc"]\n', ""))
    code, err = run_main(lk, "--out", out, "--resume")
    assert code == 0, err
    assert (out / "estimates" / "mine.pt").read_bytes() == kept  # kept
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "estimates" / "llc.pt").exists()  # the run's own stale estimate: removed
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert "estimates/loss_kernel.pt" in manifest and "notes.txt" not in manifest
    capsys.readouterr()


def test_failed_start_does_not_lock_the_folder(tmp_path, inputs, capsys):
    cfg, _, _ = inputs
    out = tmp_path / "out"
    long = torch.randint(0, 16, (16, 12), generator=torch.Generator().manual_seed(1))
    torch.save(long, tmp_path / "long.pt")
    bad = toml(tmp_path, tmp_path / "long.pt", tmp_path / "ck.pt")
    code, err = run_main(bad, "--out", out)
    assert code == 2 and "n_ctx" in err and not out.exists()  # refused before any write
    # a start that claimed the folder but committed nothing (killed before its first block)
    config_mod.claim_folder(out, config_mod.load(bad), {}, inputs={})
    assert (out / "config.json").exists()
    code, err = run_main(cfg, "--out", out)
    assert code == 0, err  # another configuration may claim it
    assert json.loads((out / "config.json").read_text())["data"]["path"].endswith("tokens.pt")
    capsys.readouterr()


def _mistakes(tmp_path: Path) -> list[tuple[str, str, list[str]]]:
    """(what, expected words of the message, arguments after ``run``)."""
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "latin1.toml").write_bytes("[model]\nname = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    (tmp_path / "a_file").write_text("x")
    torch.save({"nothing": torch.zeros(3)}, tmp_path / "wrong_arch.pt")
    nan = observables.build(**MODEL, seed=1).state_dict()
    first = next(k for k, v in nan.items() if v.is_floating_point())
    nan[first] = torch.full_like(nan[first], float("nan"))
    torch.save(nan, tmp_path / "nan.pt")
    ok = (tmp_path / "tokens.pt", tmp_path / "ck.pt")

    def cfg(extra="", data=ok[0], ck=ok[1]):
        path = toml(tmp_path, data, ck, extra=extra)
        return [str(path), "--out", str(tmp_path / "o")]

    def sampler(line):  # a [sampler] key given twice is a TOML error: replace the line
        key = line.split("=")[0].strip()
        path = Path(cfg()[0])
        text = "\n".join(x for x in path.read_text().splitlines()
                         if not x.startswith(key + " ")).replace("[sampler]\n",
                                                                  f"[sampler]\n{line}\n")
        path = tmp_path / f"s{abs(hash(line)) % 10**6}.toml"
        path.write_text(text)
        return [str(path), "--out", str(tmp_path / "o")]

    return [
        ("config folder", "not a file", [str(tmp_path / "folder.toml")]),
        ("config not UTF-8", "not UTF-8", [str(tmp_path / "latin1.toml")]),
        ("step_size string", "step_size", sampler('step_size = "1e-3"')),
        ("n_chains boolean", "n_chains", sampler("n_chains = true")),
        ("seed string", "seed", sampler('seed = "x"')),
        ("n_blocks float", "n_blocks", sampler("n_blocks = 2.5")),
        ("n_blocks zero", "n_blocks", sampler("n_blocks = 0")),
        ("step_size overflow", "step_size", sampler("step_size = 1e300")),
        ("n_beta nan", "n_beta", sampler("n_beta = nan")),
        ("rmsprop_delta inf", "rmsprop_delta", sampler("rmsprop_delta = inf")),
        ("max_loss_rise nan", "max_loss_rise", sampler("max_loss_rise = nan")),
        ("max_loss_rise zero", "max_loss_rise", sampler("max_loss_rise = 0.0")),
        ("components number", "components", _replace(cfg(), "components = []",
                                                     "components = 5")),
        ("device", "device", _replace(cfg(), "[model]\n", '[model]\ndevice = "quantum"\n')),
        ("store string", "store", cfg('[output]\nstore = "no"\n')),
        ("col_block zero", "col_block", cfg("[output]\ncol_block = 0\n")),
        ("leading zero", "unknown component",
         _replace(cfg(), "components = []", 'components = ["L00H1"]')),
        ("unicode digit", "unknown component",
         _replace(cfg(), "components = []", 'components = ["L\u0661H0"]')),
        ("checkpoint folder", "not a file", cfg(ck=tmp_path)),
        ("checkpoint junk", "not a readable torch file", cfg(ck=tmp_path / "junk.pt")),
        ("checkpoint architecture", "does not fit", cfg(ck=tmp_path / "wrong_arch.pt")),
        ("checkpoint NaN", "NaN", cfg(ck=tmp_path / "nan.pt")),
        ("tokens folder", "not a file", cfg(data=tmp_path)),
        ("tokens junk", "not a readable torch file", cfg(data=tmp_path / "junk.pt")),
        ("memory budget", "memory", cfg("[output]\nmemory_budget_gb = 1e-9\n")),
        ("out is a file", "is a file", [*cfg()[:2], str(tmp_path / "a_file")]),
        ("out under a file", "Not a directory", [*cfg()[:2], str(tmp_path / "a_file" / "o")]),
    ]


def _replace(args: list[str], old: str, new: str) -> list[str]:
    path = Path(args[0])
    assert old in path.read_text()
    changed = path.with_name(f"r{abs(hash((old, new))) % 10**6}.toml")
    changed.write_text(path.read_text().replace(old, new, 1))
    return [str(changed), *args[1:]]


def test_every_mistake_is_one_line_and_status_2(tmp_path, inputs, capsys):
    failures = []
    for what, words, args in _mistakes(tmp_path):
        code, err = run_main(*args)
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or words not in lines[0] \
                or not lines[0].startswith("suscept run: error: "):
            failures.append((what, code, err[-300:]))
    assert not failures, failures
    assert not (tmp_path / "o").exists()  # no mistake claimed the folder
    capsys.readouterr()


def test_zoo_language_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """The synthetic language ships in the installed packages: no checkout needed."""
    for name in ("experiments", "experiments.zoo", "experiments.zoo.language"):
        monkeypatch.setitem(sys.modules, name, None)  # not importable
    path = tmp_path / "zoo.toml"
    path.write_text("[model]\nn_layers = 1\nd_model = 16\nn_heads = 2\nd_head = 8\n"
                    "n_ctx = 24\n[data]\nn_sequences = 12\nseq_len = 24\nn_probe = 4\n"
                    "n_query = 2\n[observables]\ncomponents = []\ntoken_loss = false\n"
                    "[sampler]\nstep_size = 1e-3\nn_beta = 1.0\nn_chains = 1\nn_draws = 4\n"
                    "[estimators]\nwanted = ['llc']\n")
    code, err = run_main(path, "--out", tmp_path / "o")
    assert code == 0, err
    capsys.readouterr()


def test_missing_builders_are_one_line(tmp_path, monkeypatch, capsys):
    import suscept.inputs

    monkeypatch.setattr(suscept.inputs, "GROUP", "suscept.no-such-group")
    path = tmp_path / "zoo.toml"
    path.write_text("[sampler]\nstep_size = 1e-3\nn_beta = 1.0\n")
    code, err = run_main(path, "--out", tmp_path / "o")
    assert code == 2 and "pip install" in err and len(err.strip().splitlines()) == 1
    capsys.readouterr()


def plain_sigint() -> None:
    """In the child before exec: SIGINT unblocked and at its default, as from a shell (a
    test worker's own signal state is the test runner's)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_and_a_second_process(tmp_path, inputs):
    """A real process: a second run into its folder is refused while it holds it; SIGINT ends
    it with status 130 and the resume hint; the resume then finishes."""
    # far more draws than the test waits for: the run must still be going when SIGINT comes
    # (with 4,000 it sometimes finished first on a loaded machine and exited 0)
    cfg = toml(tmp_path, tmp_path / "tokens.pt", tmp_path / "ck.pt", draws=100_000, chains=1)
    cfg.write_text(cfg.read_text().replace("n_blocks = 2", "n_blocks = 10000"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "suscept", "run", str(cfg), "--out",
                             str(out), "--no-progress"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=plain_sigint)
    try:
        deadline = time.time() + 120
        while not list((out / "store" / "progress").glob("chain*.json")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.2)
        code, err = run_main(cfg, "--out", out, "--resume")
        assert code == 2 and "in use by another suscept run" in err and str(proc.pid) in err
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "interrupted" in last and "--resume" in last and "Traceback" not in err
    RunFolder(out).lock()  # the lock went with the process: the folder can be resumed
    assert list((out / "store" / "progress").glob("chain*.json"))


def test_disk_errors_are_one_line(tmp_path, inputs, capsys):
    import errno

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "o" / "store"))
    line = cli._one_line(full)
    assert "No space left on device" in line and "free space" in line and "\n" not in line
    if os.geteuid() == 0:  # root writes into read-only folders: nothing more to check here
        return
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, err = run_main(inputs[0], "--out", ro / "o")
    assert code == 2 and "Permission denied" in err and len(err.strip().splitlines()) == 1
    capsys.readouterr()
