"""One language model on several processes: DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node K main.py ...`` starts K copies of ``main.py`` with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` reads
them and joins the process group (``nccl`` on CUDA, ``gloo`` on CPU). Without them everything
here is a no-op for one process (:data:`SINGLE`).

How the trainer splits the work (see :mod:`awd_nonnormal.lm`): rank r takes its own contiguous
slice :meth:`Dist.columns` of the batch columns, so the K ranks together see the streams of one
process with the same ``--batch_size``; each rank's loss is scaled by its share of the columns so
that DDP's gradient average is the one-process gradient; per-batch numbers, the Ctrl-C request
and the evaluation sums are added up across ranks (:meth:`Dist.sum`), so every rank takes the
same decisions. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["Dist", "SINGLE", "ENV_VARS", "from_env", "setup", "shutdown", "rank_seed", "slice_hidden",
           "cat_hidden"]

#: The variables torchrun sets for every process (read by :func:`from_env`).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its
    machine. ``world == 1`` is a plain single process (no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and shows progress."""
        return self.rank == 0

    def columns(self, batch_size: int) -> Tuple[int, int]:
        """The contiguous slice ``[lo, hi)`` of ``batch_size`` columns this rank owns: the columns
        are shared out as evenly as possible, the first ``batch_size % world`` ranks getting one
        more. A rank may own none (``lo == hi``) when ``batch_size < world``."""
        base, extra = divmod(batch_size, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    def sum(self, values: Sequence[float], device: torch.device) -> List[float]:
        """``values`` added up over all ranks (float64), as a list; unchanged in one process."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def average_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` across ranks (for parameters outside the DDP
        module, e.g. a criterion's); nothing in one process."""
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (picklable, on the CPU), in rank order; ``[obj]`` in one process."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def from_env(environ=None) -> Dist:
    """The :class:`Dist` that torchrun's variables describe (:data:`SINGLE` without them).
    Raises ValueError for values that are not consistent integers."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return SINGLE
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(f"torchrun variables must be integers: "
                         f"{', '.join(f'{k}={env.get(k)!r}' for k in ENV_VARS)}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun variables: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local}")
    return Dist(rank, world, local)


def setup(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group of ``dist`` (``nccl`` for a CUDA ``device``, ``gloo`` otherwise)
    and return the device this rank trains on: ``cuda:LOCAL_RANK`` for CUDA, else ``device``.
    ``MASTER_ADDR``/``MASTER_PORT`` come from the environment (torchrun sets them)."""
    if not dist.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend=backend, rank=dist.rank,
                                             world_size=dist.world, **kwargs)
    logger.info("rank %d of %d (local rank %d): %s on %s", dist.rank, dist.world, dist.local_rank,
                backend, device)
    return device


def shutdown(barrier: bool = False) -> None:
    """Leave the process group. ``barrier``: first wait for every rank (the end of a run that
    went well), so that no rank tears down its connections while a peer still uses them (gloo
    then aborts the peer: 'terminate called without an active exception'). After a failure the
    peers may be inside another collective, so the error path leaves without the barrier."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank_seed(seed: int, rank: int, epoch: int, pos: int) -> int:
    """The seed of rank ``rank``'s dropout generator when it starts (or resumes) at ``epoch``,
    row ``pos``: distinct per rank and per starting point, the same on every run."""
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729 + pos) % (2 ** 63)


def _map_hidden(h, fn):
    if isinstance(h, Tensor):
        return fn(h)
    return type(h)(_map_hidden(v, fn) for v in h)


def slice_hidden(hidden, lo: int, hi: int):
    """Columns ``[lo, hi)`` of a hidden state (tensors ``(layers, B, N)``, in lists/tuples)."""
    return _map_hidden(hidden, lambda t: t[:, lo:hi].contiguous())


def cat_hidden(parts: Sequence[Any]):
    """The ranks' hidden states (same structure) joined along the batch columns, in rank order."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts), dim=1)
    return type(first)(cat_hidden([p[i] for p in parts]) for i in range(len(first)))
