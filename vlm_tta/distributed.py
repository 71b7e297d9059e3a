"""One run spread over processes, GPUs and nodes with ``torchrun``.

``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT ...] -m vlm_tta VERB ...`` starts
N processes per node and tells each its place in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`torchrun_world` reads it, picks the rank's
device (``cuda:LOCAL_RANK`` when CUDA is there, else the CPU), starts torch.distributed (NCCL on
GPUs, gloo on the CPU) and gives a :class:`World`; outside torchrun (or with one process) it gives
the single-process world and starts nothing.

The work itself never sends tensors between ranks: the benchmark runner and ``vlm-tta generate``
split their work by rank, and ranks share results through files (rows and per-rank partial arrays in
the run folder, embeddings in the cache). Ranks only meet to check that they planned the same work
and to wait for each other at the end; those meetings run on a gloo group (CPU objects, no GPU
memory) with a long timeout, since a rank that drew long online streams may finish hours after the
others (``VLM_TTA_DIST_TIMEOUT_S``, default one day).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import VlmTtaError

TIMEOUT_ENV = "VLM_TTA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600


class DistributedError(VlmTtaError, RuntimeError):
    """torchrun's environment or the requested device cannot make a distributed run."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its node.
    ``device`` is the rank's device (None in a single-process world: the caller's choice stands)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str | None = None
    backend: str | None = None
    group: Any = None  # the gloo group the ranks meet on (None: single process)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.size}"

    def barrier(self) -> None:
        """Wait until every rank is here (nothing to wait for in a single process)."""
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order (a JSON-like value)."""
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` from torchrun's environment, or None outside torchrun."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    raw = {n: os.environ.get(n) for n in names}
    if raw["WORLD_SIZE"] is None:
        return None
    try:
        rank, size, local = (int(raw[n] if raw[n] is not None else "0") for n in names)
    except ValueError:
        raise DistributedError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers; got {raw} (start the run with torchrun)"
        ) from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise DistributedError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}")
    return rank, size, local


def rank_device(requested: str | None, local_rank: int) -> str:
    """The device of a rank: ``cuda:LOCAL_RANK`` when CUDA is there and the user asked for no
    device or for ``cuda``; ``cpu`` when asked or without CUDA. A fixed ``cuda:N`` is refused when
    several ranks run on the node (they would share one GPU)."""
    import torch

    text = (requested or "").strip().lower()
    if text == "cpu":
        return "cpu"
    if text in ("", "cuda"):
        if not torch.cuda.is_available():
            if text == "cuda":
                raise DistributedError("--device cuda was asked but CUDA is not available on this node")
            return "cpu"
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most "
                "that many processes per node (torchrun --nproc-per-node)"
            )
        return f"cuda:{local_rank}"
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if text.startswith("cuda:") and local_size > 1:
        raise DistributedError(
            f"--device {requested} would put all {local_size} processes of this node on one GPU; leave --device "
            "out (each rank uses cuda:LOCAL_RANK) or pass --device cuda"
        )
    return requested or "cpu"


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV} must be a number of seconds; got {raw!r}") from None
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def torchrun_world(requested_device: str | None = None) -> Iterator[World]:
    """The run's :class:`World`; torch.distributed is started here when torchrun started more than
    one process, and shut down on the way out (also after an error)."""
    env = torchrun_env()
    if env is None or env[1] == 1:
        yield World()
        return
    import torch
    import torch.distributed as dist

    rank, size, local = env
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise DistributedError(
            f"WORLD_SIZE={size} is set but MASTER_ADDR/MASTER_PORT are not: start a distributed run with torchrun "
            "(or unset WORLD_SIZE for a single process)"
        )
    device = rank_device(requested_device, local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout()}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(**kwargs)
    try:
        group = dist.new_group(backend="gloo", timeout=timeout()) if backend == "nccl" else dist.group.WORLD
        yield World(rank, size, local, device, backend, group)
    finally:
        dist.destroy_process_group()


__all__ = ["DistributedError", "World", "rank_device", "torchrun_env", "torchrun_world"]
