"""How the ranks hold the model: DDP gives each a whole copy, FSDP gives each a shard.

``strategy="ddp"``: every rank keeps all the parameters, their gradients and the optimizer's
state; ``backward()`` averages the gradients (an all-reduce). ``strategy="fsdp"``: PyTorch's
``fully_shard`` splits each of them across the ranks; a block's parameters are gathered whole
just before its forward or backward and dropped after, and the gradients are reduce-scattered,
each rank keeping (and stepping) only its shard. The loop is the same for both.

What FSDP shards as a unit is a residual (or transformer) block: fewer units gather more at
once, more units talk more often. The root is sharded last and takes what is left (the stem,
the classifier).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from helpers.config import STRATEGIES, allowed
from helpers.errors import ParameterError

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch

    from helpers.loop.state import TrainState


def block_types() -> tuple[type, ...]:
    """The module classes FSDP shards one by one: torchvision's residual and transformer
    blocks."""
    from torchvision.models import resnet, vision_transformer

    return (resnet.BasicBlock, resnet.Bottleneck, vision_transformer.EncoderBlock)


def wrap(
    model: torch.nn.Module, strategy: str, device: torch.device, amp: str = "off"
) -> torch.nn.Module:
    """``model`` (on ``device``, already initialised the same on every rank) as the ranks
    train it: under DDP, or sharded by FSDP over all ranks of the process group.

    ``amp`` ("bf16" or "auto" on CUDA): FSDP gathers the parameters in bfloat16 for compute
    and reduces the gradients in float32, its mixed-precision policy; the shards it keeps and
    steps stay float32.
    """
    import torch
    import torch.distributed as dist

    allowed("strategy", strategy, STRATEGIES)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = [m for m in model.modules() if isinstance(m, block_types())]
    if not units:
        raise ParameterError(
            f"strategy='fsdp' shards a model block by block; {type(model).__name__} has no "
            f"{', '.join(t.__name__ for t in block_types())} (use strategy='ddp')"
        )
    _forget_other_ranks()
    if device.type == "cpu":
        _give_back_gathered_buffers()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    model.register_forward_pre_hook(_broadcast_buffers)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


MMAP_THRESHOLD = 4 * 2**20  # bytes: glibc maps larger blocks apart and unmaps them when freed


def _give_back_gathered_buffers() -> None:
    """Let this process return FSDP's gathered parameters and gradients to the system when it
    drops them. glibc otherwise raises its threshold for mapping blocks apart as large blocks
    are freed (up to 32 MiB), and from then on keeps every freed buffer in its heap: on a CPU a
    rank's resident memory grew to DDP's, or beyond, although it holds half the state. The
    cost: a gathered buffer's pages are faulted in afresh at each step. DDP keeps its buffers
    from step to step and is not affected (a fixed threshold changed neither its memory nor its
    step time). Linux with glibc only; elsewhere nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD: fixed from now on
    except (OSError, AttributeError):  # not glibc
        pass


def _forget_other_ranks() -> None:
    """Empty DTensor's caches of sharding decisions. They are keyed by a mesh's shape, not by
    which rank this process is in it: a Dask worker that was rank 0 in an earlier job (or
    attempt) and is rank 1 now would reuse rank 0's, and its shards would be saved, loaded and
    reduced as rank 0's (DCP then finds half of every tensor missing)."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache  # torch 2.11-2.14

    _clear_sharding_prop_cache()


def _broadcast_buffers(module: torch.nn.Module, args) -> None:
    """Before each training forward, as DDP does: FSDP shards parameters only, and each rank's
    BatchNorm statistics would drift with its own batches. Under grad mode only, which every
    rank's step shares (a placeholder step too); evaluation runs without it."""
    import torch

    if torch.is_grad_enabled():
        broadcast_buffers(module)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's floating-point buffers (BatchNorm's running statistics) to every rank, in one
    message. A collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    floats = [b for b in model.buffers() if b.is_floating_point()]
    if floats and dist.is_initialized():
        flat = torch.cat([b.detach().reshape(-1) for b in floats])
        dist.broadcast(flat, 0)
        offset = 0
        for b in floats:
            b.detach().copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP's shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def resharded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every FSDP unit back to its shards: the root keeps its parameters
    gathered after a forward (for the backward that usually follows), so after evaluation
    they would count, and be saved, whole."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def param_sum(model: torch.nn.Module) -> float:
    """The sum of all parameters of the whole model, the same number on every rank: DDP's
    replicas are in step when it matches; FSDP's shards are summed across the ranks (a
    collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    params = resharded(model).parameters()
    total = sum(_local(p).detach().double().sum() for p in params)
    total = torch.as_tensor(total, dtype=torch.float64)
    if is_sharded(model) and dist.is_initialized():
        device = next(model.parameters()).device
        total = total.to(device)
        dist.all_reduce(total)
    return float(total)


def footprint(trained: TrainState, device: torch.device) -> dict:
    """What this rank holds of the training state, in bytes, measured on its tensors:
    parameters, gradients, the optimizer's state; and the peak memory so far
    (``peak_of``: the CUDA allocator's, or this process's resident set on a CPU)."""
    import resource

    import torch

    def nbytes(tensors) -> int:
        return sum(_local(t).numel() * t.element_size() for t in tensors if t is not None)

    params = list(resharded(trained.model).parameters())
    state = trained.optimizer.state.values()
    out = {
        "param_bytes": nbytes(params),
        "grad_bytes": nbytes(p.grad for p in params),
        "optim_bytes": nbytes(v for s in state for v in s.values() if torch.is_tensor(v)),
    }
    if device.type == "cuda":
        return out | {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_of": "cuda"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return out | {"peak_bytes": peak, "peak_of": "process RSS"}
