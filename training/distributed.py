"""Multi-process training plumbing: one process per device, launched by `torchrun`.

`torchrun --nproc_per_node=N -m edm_deploy.cli train ...` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `init_from_env` then joins the process group (NCCL on CUDA, gloo on
CPU). A plain `edm-deploy train` runs as a world of one with no process group at all, so the
single-process path has no distributed overhead. Only rank 0 writes files.

Consistency rules (those of the reference NVlabs/edm training loop): every rank must start from identical weights *and buffers*.
Randomly initialised buffers such as `FourierEmbedding.freqs` differ per rank unless broadcast
(the reference's PyTorch-2.1 bug), so `broadcast_module` sends all parameters and buffers from
rank 0 before DDP wraps the network and before the EMA copy is taken; `check_consistency`
verifies it at every snapshot. The training loop destroys the process group when it returns or
fails, if (and only if) `init_from_env` created it; a group the caller set up is left alone.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from edm_deploy.runtime.core.errors import InputError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: single process, no process group
    owns_group: bool = False       # True when init_from_env created the process group (shutdown ends it)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise InputError(f"WORLD_SIZE is not an integer: {os.environ.get('WORLD_SIZE')!r}") from exc


def init_from_env(device_type: str) -> DistContext:
    """Join the process group described by torchrun's environment (no-op for a world of one)."""
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    backend = "nccl" if device_type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    else:
        backend = dist.get_backend()
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, owns_group=owns)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if `init_from_env` created it (a caller's own group is left alone)."""
    import torch.distributed as dist

    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(ctx: DistContext, obj: Any) -> list:
    """Every rank's object, in rank order (on every rank)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def agree(ctx: DistContext, check: Callable[[], Any], ranks: Optional[tuple] = None) -> Any:
    """Run `check` (on every rank, or only on `ranks`) and make every rank share its verdict.

    If it raised an `EdmDeployError` on any rank, every rank raises one with that message (the
    lowest failing rank's), instead of the others waiting forever at the next collective call.
    Returns `check`'s result (None on ranks that did not run it).
    """
    from edm_deploy.runtime.core import errors

    result, failure = None, None
    if ranks is None or ctx.rank in ranks:
        try:
            result = check()
        except errors.EdmDeployError as exc:
            failure = exc
    if not ctx.enabled:
        if failure is not None:
            raise failure
        return result
    verdicts = gather_objects(ctx, None if failure is None else
                              (type(failure).__name__, str(failure), getattr(failure, "param", None)))
    first = next(((rank, v) for rank, v in enumerate(verdicts) if v is not None), None)
    if first is None:
        return result
    if failure is not None:
        raise failure
    rank, (kind, message, param) = first
    cls = getattr(errors, kind, None)
    exc = (cls if isinstance(cls, type) and issubclass(cls, errors.EdmDeployError) else errors.InputError)(message)
    exc.param = param
    raise exc


def broadcast_module(ctx: DistContext, module: torch.nn.Module) -> None:
    """Overwrite every parameter and buffer with rank 0's values."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def all_reduce_sum(ctx: DistContext, values: list[float], device: torch.device) -> list[float]:
    if not ctx.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def module_digest(module: torch.nn.Module) -> str:
    """A hash of all parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_consistency(ctx: DistContext, module: torch.nn.Module, what: str = "network") -> None:
    """Raise if any rank's weights or buffers differ from rank 0's."""
    if not ctx.enabled:
        return
    digests = gather_objects(ctx, module_digest(module))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RuntimeError(f"DDP consistency check failed: {what} on rank(s) {bad} differs from rank 0")
