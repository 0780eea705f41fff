"""POPE across processes with torch.distributed: ``torchrun --nproc-per-node N -m mclcbf_diag.cli pope …``.

A launcher (torchrun, ``accelerate launch``, a cluster's srun wrapper) starts N processes and
sets ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) in their
environment. Each rank then answers the shard ``rank/world`` of the questions, exactly as
``--shard rank/world`` would, into its own resumable part ``OUT/ranks/rank-R-of-N`` (same
identity checks, lock, atomic appends), waits at a collective barrier (gloo on CPU, NCCL on
GPU), and rank 0 merges the parts into ``OUT`` with the same code as ``mclcbf-diag merge``.
A rerun after a kill resumes every part and merges again. Each rank uses GPU ``LOCAL_RANK``
when CUDA is available. ``--shard i/n`` with ``merge`` stays for machines that share no
process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int

    def part(self, out: Path) -> Path:
        """This rank's own resumable run folder inside ``out``."""
        return out / "ranks" / f"rank-{self.rank}-of-{self.world}"

    def parts(self, out: Path) -> list[Path]:
        return [out / "ranks" / f"rank-{r}-of-{self.world}" for r in range(self.world)]


def from_env(environ=os.environ) -> Group | None:
    """The process group a launcher described in the environment, or None (one process)."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK/WORLD_SIZE/LOCAL_RANK are not integers; start the processes with torchrun "
                        "(torchrun --nproc-per-node N -m mclcbf_diag.cli pope …)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); start with torchrun")
    return Group(rank, world, local)


def init(group: Group, timeout_s: float = 3600.0) -> None:
    """Join the process group (gloo on CPU, NCCL when this rank has a GPU)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(group.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True when every rank passes ``ok`` (a collective: every rank must call it)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
