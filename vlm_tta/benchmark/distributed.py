"""A benchmark run spread over the ranks of a torchrun world (:mod:`vlm_tta.distributed`).

Work units. Each pass of the runner's plan gives at most two units:

* its episodic jobs form a *split* unit: the stream is cut into blocks of ``--batch-size``
  consecutive positions (or a multiple of it, see :func:`block_size`) and rank ``r`` of ``n`` runs
  blocks ``r, r+n, r+2n, ...``. An episodic method forgets each image, so its predictions do not
  depend on which process makes them, and each block is one of the single process's batches, so
  even the float rounding of batched kernels is the same. The rank writes its part of each job to
  ``partials/<job id>.rank<r>of<n>.npz``, atomically: a part is complete or absent;
* its online jobs form a *whole* unit: one ordered stream per (dataset, method, seed), run from
  start to end by one rank, which writes the rows as a single process does. Whole units go to ranks
  by a deterministic least-loaded rule (images x jobs), the same on every rank.

Every rank runs its parts of the split units first (this also fills each node's embedding cache with
the images of its ranks' shares), then its whole units.

Rows. A split job's row is written by the rank whose part completes the set: it reads the ``n``
parts, checks each (same job, same stream, exactly its share of positions), merges them in stream
order and computes the metrics over the union, so the row (predictions, metrics) is the single
process's. After every rank has finished, rank 0 writes any split row still missing and removes the
partials of finished jobs. Two ranks that complete the set at the same moment may both write the
row: the same file through an atomic rename, so still one row. Timing fields of a split row add the
parts' seconds (``seconds_per_image`` is the total compute time per image, as in a single process;
the wall time is shorter), ``peak_memory_mb`` is the largest part's, ``config.split_over_ranks``
says how many parts there were, and ``run_info`` keeps the parts' value where they agree (a key
whose values differ lists them under ``per_rank``).

Dying and resuming. A killed rank leaves no row it had not finished (rows are written whole or not
at all) and at most a temporary dot-file. Running the same command again (same world size) reuses
every part that is complete and consistent with the plan, recomputes the rest and runs the online
streams that have no row from their start. Parts made by a world of another size are ignored.

``--shard i/n`` combines with this: the shard picks its passes first, then the ranks divide the
shard's work; several torchrun launches (one per shard) may share one run folder.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._atomic import atomic_write
from .runner import BenchmarkError, Job, JobOutput, Pass, Stream

if TYPE_CHECKING:
    from ..distributed import World
    from .runner import Runner

PARTIAL_VERSION = 1
#: how long rank 0 looks for a part that another rank has written but that it cannot see yet
PART_WAIT_S = 120.0
_OPTIONAL = ("scores", "noisy", "reference_scores")


# --------------------------------------------------------------------------- partial arrays
def share(length: int, rank: int, size: int, block: int) -> np.ndarray:
    """The stream positions rank ``rank`` of ``size`` runs for an episodic job: blocks ``rank,
    rank + size, ...`` of ``block`` consecutive positions."""
    positions = np.arange(length, dtype=np.int64)
    return positions[(positions // block) % size == rank]


def block_size(runner: "Runner", jobs: list[Job]) -> int:
    """The block of positions that goes whole to one rank: a multiple of every chunk the stream loop
    feeds these jobs (the runner's batch size, a method's own stream batch), so each rank's chunks
    are the single process's chunks and batched kernels give the same numbers to the last bit."""
    from ..methods import create_method

    sizes = [create_method(j.method.name, **j.options).stream_batch_size() for j in jobs]
    return math.lcm(runner.batch_size, *(s for s in sizes if s))


def partial_path(root: Path, jid: str, rank: int, size: int) -> Path:
    return Path(root) / "partials" / f"{jid}.rank{rank}of{size}.npz"


def save_partial(path: Path, out: JobOutput, meta: dict) -> None:
    """Write one rank's part of a job (arrays and a JSON header; no pickles), atomically."""
    arrays = {
        "positions": out.positions.astype(np.int64),
        "logits": out.logits.astype(np.float32),
        "skipped_positions": np.array([k for k, _, _ in out.skipped], dtype=np.int64),
    }
    for name in _OPTIONAL:
        if getattr(out, name) is not None:
            arrays[name] = getattr(out, name)
    header = {
        **meta,
        "version": PARTIAL_VERSION,
        "skipped": [list(s) for s in out.skipped],
        "seconds": out.seconds,
        "method_seconds": out.method_seconds,
        "peak_memory_mb": out.peak_memory_mb,
        "memory_kind": out.memory_kind,
        "run_info": out.run_info,
    }
    arrays["header"] = np.array(json.dumps(header, sort_keys=True, default=str))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_partial(path: Path, meta: dict, positions: np.ndarray, n_classes: int) -> JobOutput | None:
    """A part written by :func:`save_partial`, or None when it is missing, unreadable, or not the
    part ``meta`` describes (job id, rank, world size, stream) covering exactly ``positions``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        header = json.loads(str(arrays.pop("header")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    try:
        if header.get("version") != PARTIAL_VERSION or any(header.get(k) != v for k, v in meta.items()):
            return None
        pos, skipped = arrays["positions"], arrays["skipped_positions"]
        n = len(pos)
        if arrays["logits"].shape != (n, n_classes) or any(len(arrays[k]) != n for k in _OPTIONAL if k in arrays):
            return None
        if not np.array_equal(np.sort(np.concatenate([pos, skipped])), positions) or np.any(np.diff(pos) <= 0):
            return None
        return JobOutput(
            positions=pos,
            logits=arrays["logits"],
            scores=arrays.get("scores"),
            noisy=arrays.get("noisy"),
            reference_scores=arrays.get("reference_scores"),
            skipped=[(int(k), str(name), str(reason)) for k, name, reason in header["skipped"]],
            seconds=float(header["seconds"]),
            method_seconds=float(header["method_seconds"]),
            peak_memory_mb=float(header["peak_memory_mb"]),
            memory_kind=str(header["memory_kind"]),
            run_info=dict(header["run_info"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def merge_parts(parts: list[JobOutput]) -> JobOutput:
    """One job's output over the whole stream from its parts, in stream order."""
    pos = np.concatenate([p.positions for p in parts])
    order = np.argsort(pos, kind="stable")

    def joined(name: str):
        # an empty part has no scores (no predictions): it neither gives nor withholds them
        full = [p for p in parts if len(p.positions)]
        if not full or any(getattr(p, name) is None for p in full):
            return None
        return np.concatenate([getattr(p, name) for p in full])[order]

    nonempty = [p for p in parts if len(p.positions)]
    logits = np.concatenate([p.logits for p in nonempty])[order] if nonempty else parts[0].logits
    return JobOutput(
        positions=pos[order],
        logits=logits,
        scores=joined("scores"),
        noisy=joined("noisy"),
        reference_scores=joined("reference_scores"),
        skipped=sorted((s for p in parts for s in p.skipped), key=lambda s: s[0]),
        seconds=sum(p.seconds for p in parts),
        method_seconds=sum(p.method_seconds for p in parts),
        peak_memory_mb=max(p.peak_memory_mb for p in parts),
        memory_kind=parts[0].memory_kind,
        run_info=merge_run_info([p.run_info for p in parts]),
    )


def merge_run_info(infos: list[dict]) -> dict:
    """The parts' ``run_info``: a key's value where every part agrees, else ``{"per_rank": [...]}``."""
    out: dict = {}
    for key in dict.fromkeys(k for info in infos for k in info):
        values = [info.get(key) for info in infos]
        out[key] = values[0] if all(v == values[0] for v in values) else {"per_rank": values}
    return out


# --------------------------------------------------------------------------- the work of one rank
@dataclass
class Unit:
    """Jobs of one pass that run together: split over every rank (``owner`` None) or whole on one."""

    pass_: Pass
    jobs: list[Job]
    owner: int | None
    stream: Stream
    block: int = 0  # split units: positions per block (see :func:`block_size`)

    @property
    def split(self) -> bool:
        return self.owner is None


class RankWork:
    """What rank ``rank`` of ``size`` does in a run of ``runner``'s plan (see the module docstring).
    :func:`run_distributed` drives it; tests drive the ranks of a world one after the other."""

    def __init__(self, runner: "Runner", rank: int, size: int) -> None:
        self.runner, self.rank, self.size = runner, rank, size
        i, n = runner.shard
        self.passes = [p for k, p in enumerate(runner.plan()) if k % n == i]
        self.units = self._units()

    def _units(self) -> list[Unit]:
        from ..methods import get_method_class

        units, load = [], [0] * self.size
        for p in self.passes:
            stream = self.runner.open_stream(p)
            episodic = [j for j in p.jobs if get_method_class(j.method.name).episodic]
            online = [j for j in p.jobs if not get_method_class(j.method.name).episodic]
            if episodic:
                units.append(Unit(p, episodic, None, stream, block_size(self.runner, episodic)))
            if online:
                owner = min(range(self.size), key=lambda r: (load[r], r))
                load[owner] += len(stream.order) * len(online)
                units.append(Unit(p, online, owner, stream))
        return units

    @property
    def job_ids(self) -> list[str]:
        return [j.id for p in self.passes for j in p.jobs]

    def plan_digest(self) -> list:
        """What every rank must agree on before any work: the jobs, their streams and owners."""
        return [[u.owner, u.stream.digest, u.block, [j.id for j in u.jobs]] for u in self.units]

    def rows_done(self) -> int:
        return sum(self.runner.store.has(jid) for jid in self.job_ids)

    # ----------------------------------------------------------------- parts
    def _meta(self, unit: Unit, job: Job, rank: int) -> dict:
        return {"job_id": job.id, "rank": rank, "size": self.size, "block": unit.block, "stream": unit.stream.digest}

    def _n_classes(self, unit: Unit) -> int:
        return len(unit.stream.ds.classnames)

    def _load(self, unit: Unit, job: Job, rank: int) -> JobOutput | None:
        path = partial_path(self.runner.store.root, job.id, rank, self.size)
        positions = share(len(unit.stream.order), rank, self.size, unit.block)
        return load_partial(path, self._meta(unit, job, rank), positions, self._n_classes(unit))

    def assemble(self, unit: Unit, job: Job) -> bool:
        """Write ``job``'s row from its parts when all are there and sound; True when written."""
        root = self.runner.store.root
        if self.runner.store.has(job.id) or not all(
            partial_path(root, job.id, r, self.size).is_file() for r in range(self.size)
        ):
            return False  # (cheap checks first: every rank tries this after each of its parts)
        parts = []
        for r in range(self.size):
            part = self._load(unit, job, r)
            if part is None:
                return False
            parts.append(part)
        self.runner.write_row(unit.pass_, job, unit.stream, merge_parts(parts), parts=self.size)
        return True

    def _run_split(self, unit: Unit) -> int:
        todo = [j for j in unit.jobs if not self.runner.store.has(j.id)]
        fresh = [j for j in todo if self._load(unit, j, self.rank) is None]
        if fresh:
            positions = share(len(unit.stream.order), self.rank, self.size, unit.block)
            outs = self.runner.compute(unit.pass_, fresh, unit.stream, positions)
            for job, out in zip(fresh, outs):
                save_partial(
                    partial_path(self.runner.store.root, job.id, self.rank, self.size),
                    out,
                    self._meta(unit, job, self.rank),
                )
        if len(fresh) < len(todo):
            self.runner.log(f"reused {len(todo) - len(fresh)} finished part(s) of {unit.pass_.dataset.name}")
        return sum(self.assemble(unit, job) for job in todo)

    # ----------------------------------------------------------------- the run
    def run(self) -> int:
        """This rank's parts of the split units, then its whole units; returns the rows it wrote."""
        written = 0
        for unit in self.units:
            if unit.split:
                written += self._run_split(unit)
        for unit in self.units:
            if unit.owner == self.rank:
                todo = [j for j in unit.jobs if not self.runner.store.has(j.id)]
                if todo:
                    self.runner._run_pass(unit.pass_, todo)
                    written += len(todo)
        return written

    def finish(self) -> int:
        """Rank 0, once every rank is done: write split rows still missing, then remove the
        partials of finished jobs. Returns the rows written; raises when a part is missing.

        Every part exists by now, but a network filesystem may show another node's new file only
        after its attribute cache expires (NFS: up to a minute), so a missing part is looked for
        again for up to :data:`PART_WAIT_S` seconds."""
        written = 0
        deadline = time.monotonic() + PART_WAIT_S
        while True:
            missing = []
            for unit in self.units:
                for job in unit.jobs if unit.split else ():
                    if not self.runner.store.has(job.id):
                        if self.assemble(unit, job):
                            written += 1
                        else:
                            missing.append(f"{unit.pass_.dataset.name} {job.method.label} ({job.id})")
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(2.0)
        folder = self.runner.store.root / "partials"
        for jid in self.job_ids:
            if self.runner.store.has(jid):
                for path in folder.glob(f"{jid}.rank*of*.npz"):
                    path.unlink(missing_ok=True)
        try:
            folder.rmdir()  # only when empty: another shard's parts stay
        except OSError:
            pass
        if missing:
            raise BenchmarkError(
                f"{len(missing)} job(s) split over the ranks have a missing or inconsistent part: "
                + "; ".join(missing[:5])
                + f". Is --out on a filesystem every node sees ({self.runner.store.root})? Run the same command "
                "again to redo those parts."
            )
        return written


def run_distributed(runner: "Runner", world: "World") -> dict:
    """Run ``runner``'s plan as rank ``world.rank`` of ``world.size``; every rank calls this.
    Returns the run's counts (complete on rank 0)."""
    work = RankWork(runner, world.rank, world.size)
    before = work.rows_done()
    digests = world.gather(work.plan_digest())
    if any(d != digests[0] for d in digests):
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise BenchmarkError(
            f"rank(s) {bad} planned other work than rank 0 (other jobs or other images): every node must see "
            "the same datasets, suite and options (same --data-root contents, same command)"
        )
    work.run()
    world.barrier()
    if world.rank == 0:
        work.finish()
    ran = work.rows_done() - before if world.rank == 0 else 0
    return {
        "passes": len(work.passes),
        "jobs": len(work.job_ids),
        "already_done": before,
        "ran": ran,
        "ranks": world.size,
    }


__all__ = ["RankWork", "load_partial", "merge_parts", "run_distributed", "save_partial", "share"]
