"""POPE across processes with torch.distributed: ``torchrun --nproc-per-node N -m mclcbf_diag.cli pope …``.

A launcher (torchrun, ``accelerate launch``, a cluster's srun wrapper) starts N processes and
sets ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) in their
environment. Each rank then answers the shard ``rank/world`` of the questions, exactly as
``--shard rank/world`` would, into its own resumable part ``OUT/ranks/rank-R-of-N`` (same
identity checks, lock, atomic appends). The ranks then meet through the launch's c10d store
(``torch.distributed.rendezvous("env://")``: torchrun's own store, or one rank 0 hosts): each
posts whether its shard finished, rank 0 merges the parts into ``OUT`` with the same code as
``mclcbf-diag merge``, and every rank waits for that merge before it leaves. A rerun after a
kill resumes every part and merges again. Each rank uses GPU ``LOCAL_RANK`` when CUDA is
available. ``--shard i/n`` with ``merge`` stays for machines that share no store.

Why a store and not a process group: the ranks exchange one flag each and wait twice, and a
store does both with plain requests. A gloo process group also runs worker and transport
threads, and torch's threads that still hold a tensor while the interpreter shuts down are a known
way for a process to abort (SIGABRT) after its work is done. CI saw a rank of a gloo-group launch
abort twice (its stack was not kept, so the cause is inferred); a store starts no such thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..errors import UserError, first_line


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
    """The launch a launcher described in the environment, or None (one process)."""
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


STEP_TIMEOUT_S = 3600.0  # merging: rank 0 alone works meanwhile
FINISH_TIMEOUT_S = 7 * 86400.0  # waiting for the slowest shard: no deadline a real run could reach
LEAVE_TIMEOUT_S = 60.0


class Meeting:
    """This launch's ranks, meeting through a c10d store: agree on a flag at each named step, then leave.

    Each step has its own keys (``PREFIX/STEP/RANK``), used once per launch, so a rank may post to a step without
    waiting (:meth:`post_failure`) and the others read it when they get there.
    """

    def __init__(self, group: Group, store, prefix: str):
        self.group, self._store, self._prefix = group, store, prefix

    def _keys(self, step: str) -> list[str]:
        return [f"{self._prefix}/{step}/{r}" for r in range(self.group.world)]

    def agree(self, step: str, ok: bool, timeout_s: float = STEP_TIMEOUT_S) -> bool:
        """Post ``ok`` for this rank at ``step`` and wait for every rank's: True when all passed ``ok``."""
        keys = self._keys(step)
        try:
            self._store.set(keys[self.group.rank], "1" if ok else "0")
            self._store.wait(keys, timedelta(seconds=timeout_s))
            return all(self._store.get(k).decode() == "1" for k in keys)
        except RuntimeError as exc:  # a timeout, or the store's host gone (DistStoreError is a RuntimeError)
            raise UserError(f"rank {self.group.rank} of {self.group.world} lost the other ranks at step "
                            f"{step!r} ({first_line(exc)}); each rank kept its part in "
                            "OUT/ranks: rerun the same command to resume") from None

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank finished its part (:meth:`agree` at ``finished``, with no deadline a run could reach)."""
        return self.agree("finished", ok, FINISH_TIMEOUT_S)

    def post_failure(self, step: str = "finished") -> None:
        """Post "failed" for this rank at ``step`` without waiting (a rank that stops on an unexpected error)."""
        try:
            self._store.set(self._keys(step)[self.group.rank], "0")
        except RuntimeError:
            pass  # the store is gone: the launcher is already stopping the others

    def leave(self) -> None:
        """Rank 0 may host the store: it leaves last, so no rank loses the store mid-request."""
        import time

        key = f"{self._prefix}/left"
        try:
            self._store.add(key, 1)
            if self.group.rank == 0:
                deadline = time.monotonic() + LEAVE_TIMEOUT_S
                while self._store.add(key, 0) < self.group.world and time.monotonic() < deadline:
                    time.sleep(0.05)
        except RuntimeError:
            pass  # a rank gone first: nothing is left to protect


def meet(group: Group) -> Meeting:
    """Connect to the launch's store (``MASTER_ADDR``/``MASTER_PORT``, set by the launcher)."""
    import torch.distributed as dist

    environ = os.environ
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(v)]
    if missing:
        raise UserError(f"WORLD_SIZE={group.world} but {' and '.join(missing)} not set: start the processes with "
                        "torchrun (torchrun --nproc-per-node N -m mclcbf_diag.cli pope …), which sets them")
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=group.rank, world_size=group.world,
                                           timeout=timedelta(seconds=STEP_TIMEOUT_S)))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"rank {group.rank} could not reach the launch's store at {environ['MASTER_ADDR']}:"
                        f"{environ['MASTER_PORT']} ({first_line(exc)}); check MASTER_ADDR/MASTER_PORT, "
                        "or start with torchrun") from None
    # torchrun restarts failed workers against the same store: each attempt keeps its own keys. The count is each
    # node's agent's own, so on several nodes a launch must not restart (--max-restarts 0, torchrun's default)
    return Meeting(group, store, f"mclcbf-diag/pope/attempt-{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
