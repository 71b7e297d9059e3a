"""Result rows: one JSON file per finished job, written atomically, so runs resume and shard safely.

Layout of a run folder (``--out``)::

    rows/<job id>.json          one finished row (the file appears only when the row is complete)
    predictions/<job id>.npz    per-image arrays of that row (positions, labels, predictions,
                                scores, noisy flags), for curves and re-analysis (no pickles)
    subsets/, mixes/            the seeded image selections the run used (JSON, see vlm_tta.data)

A job's id is a hash of everything that defines it (suite, dataset, method and its full config,
model fingerprint, prompts, views, seed, limit, protocol extras), so a finished job is never run
again, a changed option is a new job, and several processes writing into one folder never collide:
each writes its own files, through a temporary file and an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .._atomic import atomic_write

ROW_VERSION = 1


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def job_id(identity: dict) -> str:
    """A short stable id of a job from the fields that define it."""
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:20]


class ResultStore:
    """The rows of a run folder (see the module docstring)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.root = Path(out).expanduser()
        self.rows_dir = self.root / "rows"
        self.predictions_dir = self.root / "predictions"

    def has(self, jid: str) -> bool:
        return (self.rows_dir / f"{jid}.json").is_file()

    def write(self, row: dict, arrays: dict[str, np.ndarray] | None = None) -> Path:
        """Write a finished row (its arrays first, so a row never points at missing arrays)."""
        jid = row["job_id"]
        if arrays:
            # uncompressed: zlib saved ~16% of the bytes of float32 logits but was a quarter of a warm run's overhead
            atomic_write(self.predictions_dir / f"{jid}.npz", lambda f: np.savez(f, **arrays))
        path = self.rows_dir / f"{jid}.json"
        atomic_write(path, lambda f: f.write(json.dumps(row, indent=1, sort_keys=True, default=str).encode()))
        return path

    def rows(self) -> list[dict]:
        """Every finished row, in a stable order (unreadable files are skipped)."""
        out = []
        for path in sorted(self.rows_dir.glob("*.json")) if self.rows_dir.is_dir() else []:
            try:
                row = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(row, dict) and row.get("job_id") == path.stem:
                out.append(row)
        return out

    def arrays(self, jid: str) -> dict[str, np.ndarray] | None:
        path = self.predictions_dir / f"{jid}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def iter_rows(folders) -> Iterator[tuple[ResultStore, dict]]:
    """``(store, row)`` over several run folders, each job once."""
    seen = set()
    for folder in folders:
        store = ResultStore(folder)
        for row in store.rows():
            if row["job_id"] not in seen:
                seen.add(row["job_id"])
                yield store, row


def environment() -> dict:
    """Package versions, Python, platform and the git revision of the working directory (when any)."""
    import importlib.metadata as md

    versions = {}
    for dist in ("vlm-tta", "torch", "torchvision", "open_clip_torch", "transformers", "diffusers", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    info = {"versions": versions, "python": platform.python_version(), "platform": platform.platform()}
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
        if rev:
            info["git"] = rev
    except (OSError, subprocess.SubprocessError):
        pass
    return info
