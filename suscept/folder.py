"""The results folder of ``suscept run``: what it owns, who holds it, which inputs made it.

``suscept run`` never deletes or overwrites a file it did not write. The folder keeps
``manifest.json``, the list of paths the run wrote (a path ending in ``/`` owns everything
under it, e.g. the draw store); a path that exists and is not listed is never touched, and a
non-empty folder without a manifest is refused as "not a suscept run folder".

While a run writes, it holds an exclusive lock on ``lock`` (``fcntl.flock``; the file names the
holder's process id), so a second run into the same folder is refused at once instead of
mixing its draws with the first. A folder is *committed* once its draw store holds a committed
block or a finished run is saved in ``run/``; an uncommitted folder (a start that failed
before its first committed block) may be claimed again by any configuration.

The *inputs* of a run are identified by content (:func:`fingerprint`): sha256 of the
checkpoint file and of the ``[data]`` token file, sha256 of the model's weights and of every
token the run reads, the model's architecture, and the probe losses at the anchor. A resume
whose inputs differ from those recorded in ``inputs.json`` is refused, naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from suscept.errors import ConfigError

MANIFEST = "manifest.json"
LOCK = "lock"
ARCH_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "d_mlp",
             "attn_only", "act_fn", "normalization_type", "positional_embedding_type", "dtype")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a uniquely named temporary file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(cfg: dict, model: torch.nn.Module, tokens: dict[str, torch.Tensor],
                anchor_loss: torch.Tensor) -> dict:
    """What identifies a run's inputs by content (see the module docstring).

    ``tokens``: ``{"train": [n, pos], "query": [q, pos]}``; ``anchor_loss``: the probe's
    per-sample losses at w* ``[n_probe]``.
    """
    m, d = cfg["model"], cfg["data"]
    arch = {k: str(getattr(model.cfg, k)) for k in ARCH_KEYS if hasattr(model, "cfg")
            and hasattr(model.cfg, k)}
    return {
        "checkpoint_sha256": sha256_file(Path(m["checkpoint"])) if m["checkpoint"] else None,
        "data_sha256": sha256_file(Path(d["path"])) if d["kind"] == "tokens" else None,
        "weights_sha256": sha256_tensors(dict(model.state_dict())),
        "tokens_sha256": sha256_tensors(tokens),
        "model_config": arch,
        "anchor_loss": [float(x) for x in anchor_loss.double().cpu()],
    }


def changed_inputs(old: dict, new: dict, cfg: dict) -> list[str]:
    """Phrases naming each input that differs between two fingerprints."""
    out = []
    ck, path = cfg["model"]["checkpoint"], cfg["data"]["path"]
    if old.get("checkpoint_sha256") != new["checkpoint_sha256"]:
        out.append(f"the checkpoint file {ck} (sha256 {_short(old.get('checkpoint_sha256'))} "
                   f"-> {_short(new['checkpoint_sha256'])})")
    if old.get("data_sha256") != new["data_sha256"]:
        out.append(f"the token file {path} (sha256 {_short(old.get('data_sha256'))} -> "
                   f"{_short(new['data_sha256'])})")
    if old.get("model_config") != new["model_config"]:
        keys = sorted(k for k in set(old.get("model_config") or {}) | set(new["model_config"])
                      if (old.get("model_config") or {}).get(k) != new["model_config"].get(k))
        out.append(f"the model architecture ({keys})")
    if not out and old.get("weights_sha256") != new["weights_sha256"]:
        out.append("the model weights at the anchor")
    if not out and old.get("tokens_sha256") != new["tokens_sha256"]:
        out.append("the token ids of the data")
    a, b = old.get("anchor_loss") or [], new["anchor_loss"]
    if not out and (len(a) != len(b) or any(not math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7)
                                            for x, y in zip(a, b))):
        out.append("the probe losses at the anchor (other code or library versions?)")
    return out


def _short(h: str | None) -> str:
    return "none" if h is None else h[:12]


class RunFolder:
    """A results folder and the paths this tool owns in it (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.owned: set[str] = set()
        self._lock = None
        self.check()

    def check(self) -> None:
        """Refuse a path that is a file, or a non-empty folder that no run wrote."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"output folder {p} is a file; pass a folder (new or empty, or "
                              "one that suscept run wrote) to --out")
        if not p.is_dir() or not any(p.iterdir()):
            self.owned = set()
            return
        man = p / MANIFEST
        try:
            files = json.loads(man.read_text())["files"]
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise ValueError("files must be a list of paths")
        except FileNotFoundError:
            raise ConfigError(f"{p} is not empty and is not a suscept run folder (no "
                              f"{MANIFEST}); suscept run never writes into a folder it did not "
                              "create: choose a new or empty folder") from None
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ConfigError(f"{man} is damaged ({e}); choose a new folder") from e
        self.owned = {f for f in files if not Path(f).is_absolute() and ".." not in Path(f).parts}

    def owns(self, rel: str) -> bool:
        return rel in self.owned or any(rel.startswith(d) for d in self.owned if d.endswith("/"))

    def check_writable(self, rels: list[str]) -> None:
        """Refuse when one of ``rels`` exists and was not written by a run."""
        for rel in rels:
            target = self.path / rel.rstrip("/")
            if (target.exists() or target.is_symlink()) and not self.owns(rel):
                raise ConfigError(f"{target} was not written by suscept run and is never "
                                  "overwritten; move it away or choose another output folder")

    def record(self, *rels: str) -> None:
        """Add ``rels`` to the manifest (written atomically)."""
        self.owned |= {*rels, MANIFEST}
        write_atomic(self.path / MANIFEST, json.dumps({"files": sorted(self.owned)}, indent=1))

    def lock(self) -> None:
        """Create the folder and hold its exclusive lock until the process ends or
        :meth:`unlock`; refused at once when another process holds it."""
        self.check_writable([LOCK])
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(f"{self.path} is in use by another suscept run (process "
                              f"{holder}); wait for it to end, or use another folder") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f
        others = [q.name for q in self.path.iterdir() if q.name != LOCK]
        if others:  # the manifest as the last holder left it (refused if there is none)
            self.check()
        self.record(LOCK)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def committed(self) -> bool:
        """Whether the folder holds committed draws or a finished run."""
        progress = self.path / "store" / "progress"
        return (self.path / "run" / "run.json").exists() or (
            progress.is_dir() and any(progress.glob("chain*.json")))

    def remove_owned(self, rel: str) -> None:
        """Delete an owned file, or an owned folder (``rel`` ending in ``/``) and its contents."""
        if not self.owns(rel):
            return
        target = self.path / rel.rstrip("/")
        if rel.endswith("/") and target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.is_file() or target.is_symlink():
            target.unlink()
