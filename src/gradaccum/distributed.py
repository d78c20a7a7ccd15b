"""torch.distributed glue: who reduces gradients over which ranks, summing counts, and sync control.

DDP, FSDP1 and FSDP2 (HSDP included) *average* gradients over their data-parallel ranks. The
Accumulator divides by the global count itself, so it multiplies each rank's share by the number
of ranks the wrapper averages over, turning that average back into the sum the big batch needs,
and it sums the counts over exactly those ranks. `describe()` reads both from the wrapper (its own
process group or device mesh, not WORLD), and refuses what it cannot read: "exact or loud".
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch 2.4 / 2.5 keep FSDP2 under _composable
    try:
        from torch.distributed._composable.fsdp import FSDPModule  # type: ignore
    except ImportError:  # pragma: no cover - builds without distributed
        FSDPModule = ()  # type: ignore
try:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
except ImportError:  # pragma: no cover - builds without distributed
    FSDP1 = ()  # type: ignore

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def fsdp_roots(model: nn.Module) -> list[nn.Module]:
    """The outermost FSDP2-sharded modules of `model` (usually just `model`)."""
    if not FSDPModule:
        return []
    if isinstance(model, FSDPModule):
        return [model]
    roots, stack = [], list(model.children())
    while stack:
        module = stack.pop()
        if isinstance(module, FSDPModule):
            roots.append(module)
        else:
            stack.extend(module.children())
    return roots


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's OptimizedModule wrapper(s); `model` itself otherwise."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


@dataclass(frozen=True)
class GradientReduction:
    """How a model's gradients are reduced over data-parallel ranks: what the Accumulator must match.

    `groups` are process groups whose all-reduces, one after the other, sum over exactly the ranks
    the gradients are reduced over (two for HSDP / FSDP1 hybrid sharding: shard, then replicate);
    empty on one process. `factor` is what each rank's loss share is multiplied by: the number the
    wrapper divides the gradient sum by (its ranks when it averages, 1 when it sums).
    """

    wrapper: str  # "none", "DDP", "FSDP1", "FSDP2" or "explicit"
    groups: tuple = ()
    factor: float = 1
    collective_forward: bool = False  # FSDP gathers weights in forward: every rank runs as many
    clip_module: Any = None  # FSDP1 root: only its clip_grad_norm_ sees the sharded flat gradients

    @property
    def syncs(self) -> bool:
        return bool(self.groups)

    @property
    def num_ranks(self) -> int:
        return math.prod(dist.get_world_size(group) for group in self.groups)

    @property
    def rank(self) -> int:
        """This rank's index in 0..num_ranks-1 (row-major over `groups`, so every rank has its own)."""
        index, stride = 0, 1
        for group in self.groups:
            index += stride * dist.get_rank(group)
            stride *= dist.get_world_size(group)
        return index

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum `values` over the data-parallel ranks (in place) and return it."""
        for group in self.groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return values


_HOW_TO_SAY = ("pass process_group= (the group whose ranks reduce these gradients; dist.group.WORLD "
               "for all ranks) and gradient_average= (True if the reduction averages over those ranks, "
               "False if it sums them) to Accumulator")


def describe(model: nn.Module, process_group: Any = None, gradient_average: bool | None = None
             ) -> GradientReduction:
    """How `model`'s gradients are reduced over ranks; raises ValueError where that cannot be read.

    Recognised: DDP (on any process group), FSDP1 (hybrid sharding included), FSDP2 (a 1-D or 2-D
    HSDP mesh), each also under torch.compile. The explicit arguments override the detection: a
    user who all-reduces gradients by hand passes both. One process (or a world of one) needs none.
    """
    if gradient_average not in (None, True, False):
        raise ValueError(f"gradient_average must be True, False or None, got {gradient_average!r}")
    if not is_distributed() or world_size() == 1:
        return GradientReduction("none")
    found, doubt = _detect(unwrap_compiled(model))
    if doubt is not None:
        missing_group = process_group is None and (found is None or not found.groups)
        if gradient_average is None or missing_group:
            raise ValueError(f"{doubt}; gradaccum cannot tell how its gradients are reduced over the "
                             f"{world_size()} ranks: {_HOW_TO_SAY}")
    if found is None:
        found = GradientReduction("explicit", (process_group,))
    elif process_group is not None:  # a wrapper we read must agree; one we doubt is overridden
        found = replace(found, groups=(process_group if doubt else _checked_group(process_group, found),))
    if gradient_average is not None:
        found = replace(found, factor=found.num_ranks if gradient_average else 1)
    return found


def _checked_group(process_group: Any, found: GradientReduction) -> Any:
    """`process_group` if it holds the same ranks as the wrapper's reduction; ValueError otherwise."""
    ranks = set(dist.get_process_group_ranks(process_group))
    mine = set().union(*(dist.get_process_group_ranks(group) for group in found.groups))
    if len(ranks) != found.num_ranks or not mine <= ranks:
        raise ValueError(f"process_group= holds ranks {sorted(ranks)}, but the {found.wrapper} wrapper "
                         f"reduces gradients over {found.num_ranks} ranks (this one with {sorted(mine)}): "
                         "counts and gradients must be summed over the same ranks; leave process_group=None "
                         "to use the wrapper's")
    return process_group


def _detect(module: nn.Module) -> tuple[GradientReduction | None, str | None]:
    """The wrapper's reduction (or None), and why it cannot be trusted without explicit arguments."""
    if isinstance(module, DistributedDataParallel):
        return _detect_ddp(module)
    if FSDP1 and isinstance(module, FSDP1):
        return _detect_fsdp1(module)
    if fsdp_roots(module):
        return _detect_fsdp2(module)
    name = type(module).__name__
    for child in module.modules():
        if isinstance(child, DistributedDataParallel) or (FSDP1 and isinstance(child, FSDP1)):
            return None, (f"the model ({name}) holds a {type(child).__name__} inside it rather than being "
                          "one (pass that wrapper itself as the model)")
    return None, f"the model ({name}) is not wrapped in DDP, FSDP1 or FSDP2"


def _detect_ddp(ddp: DistributedDataParallel) -> tuple[GradientReduction, str | None]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    averaging = (default_hooks.allreduce_hook, default_hooks.fp16_compress_hook, default_hooks.bf16_compress_hook)
    group, doubt = ddp.process_group, None
    for hook, state in getattr(ddp, "_comm_hooks", []):
        if hook in averaging and (state is None or isinstance(state, dist.ProcessGroup)):
            group = state or dist.group.WORLD  # these hooks average over their state's group, or WORLD
        else:
            doubt = f"DDP has a communication hook ({getattr(hook, '__name__', hook)}) that may not average"
    return GradientReduction("DDP", (group,), factor=dist.get_world_size(group)), doubt


def _detect_fsdp1(root: nn.Module) -> tuple[GradientReduction, str | None]:
    groups, across = (root.process_group,), getattr(root, "_inter_node_pg", None)
    if across is not None and "HYBRID" in root.sharding_strategy.name:
        groups += (across,)  # reduce-scatter within a node, then all-reduce across nodes
    elif across is not None and dist.get_world_size(across) > 1:
        raise ValueError("FSDP1 turned hybrid sharding into NO_SHARD because its shard group has one rank, "
                         "so it never reduces gradients across its replicas: use DDP for pure replication, "
                         "or shard groups of 2 or more ranks")
    # FSDP1 divides by predivide before and postdivide after the reduction: their product in all.
    factor = round(root._gradient_predivide_factor * root._gradient_postdivide_factor)
    doubt = None
    if getattr(root, "_comm_hook", None) is not None:
        from torch.distributed.algorithms._comm_hooks import default_hooks

        if root._comm_hook not in (default_hooks.allreduce_hook, default_hooks.reduce_scatter_hook,
                                   default_hooks.fp16_compress_hook, default_hooks.bf16_compress_hook):
            doubt = f"FSDP has a communication hook ({getattr(root._comm_hook, '__name__', '?')}) that may not average"
    return GradientReduction("FSDP1", groups, factor, collective_forward=True, clip_module=root), doubt


def _detect_fsdp2(model: nn.Module) -> tuple[GradientReduction | None, str | None]:
    """FSDP2: the data-parallel mesh of every parameter group (one mesh for all, or refused)."""
    meshes, factors, doubt = {}, set(), None
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.10: a list
        if groups is None:
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        for group in groups:
            for info in [group.mesh_info] + [getattr(p, "mesh_info", group.mesh_info) for p in group.fsdp_params]:
                meshes[(tuple(info.mesh.mesh.shape), tuple(info.mesh.mesh.flatten().tolist()))] = info
            divide = getattr(group, "gradient_divide_factor", getattr(group, "_reduce_scatter_divide_factor", None))
            factors.add(divide)
            if getattr(group, "_all_reduce_hook", None) is not None:
                doubt = "an FSDP2 module has an all-reduce hook that may not average"
    if len(meshes) != 1:  # e.g. experts on their own mesh: no one group holds every gradient's ranks
        return GradientReduction("FSDP2", collective_forward=True), \
            f"FSDP2 parameters are spread over {len(meshes)} different device meshes"
    info = next(iter(meshes.values()))
    groups = tuple(g for g in (getattr(info, "shard_process_group", None),
                               getattr(info, "replicate_process_group", None)) if g is not None)
    found = GradientReduction("FSDP2", groups, collective_forward=True)
    if len(factors) > 1:
        return found, f"FSDP2 modules divide gradients by different factors ({factors})"
    divide = factors.pop() if factors else None
    found = replace(found, factor=found.num_ranks if divide is None else divide)
    unsharded = [name for name, p in model.named_parameters() if p.requires_grad and not hasattr(p, "device_mesh")]
    if unsharded:
        doubt = (f"{len(unsharded)} trainable parameters (e.g. {unsharded[0]}) are outside every fully_shard "
                 "module, so nothing reduces their gradients (call fully_shard on the root module too)")
    return found, doubt


def fsdp1_clip_grad_norm(root: nn.Module, params: list[torch.Tensor], max_norm: float | None) -> float:
    """The global L2 norm of FSDP1's sharded gradients (before clipping); clip them to `max_norm`.

    FSDP1's own `clip_grad_norm_` takes the norm in float32 and refuses float64 gradients; this one
    keeps the gradients' precision. Each rank holds a disjoint shard of every flat gradient (its zero
    padding adds nothing), so the squared norm is the sum of the local ones over the shard group.
    """
    strategies = {module.sharding_strategy.name for module in root.modules() if isinstance(module, FSDP1)}
    if len(strategies) > 1:  # sharded and unsharded instances mixed: FSDP1 sorts them out itself
        return float(root.clip_grad_norm_(max_norm if max_norm is not None else math.inf))
    grads = [p.grad for p in params if p.grad is not None]
    dtype = torch.float32
    for grad in grads:
        dtype = torch.promote_types(dtype, grad.dtype)
    device = grads[0].device if grads else root.compute_device
    squares = torch.zeros((), dtype=dtype, device=device)
    for grad in grads:
        squares += torch.linalg.vector_norm(grad, dtype=dtype).square()
    if strategies != {"NO_SHARD"} and dist.get_world_size(root.process_group) > 1:
        dist.all_reduce(squares, group=root.process_group)  # every rank joins, with or without grads
    total = squares.sqrt()
    if max_norm is not None:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))
    return float(total)


def shards_gradients(model: nn.Module) -> bool:
    """True under FSDP1 or FSDP2, which keep sharded gradients of their own."""
    model = unwrap_compiled(model)
    return bool((FSDP1 and isinstance(model, FSDP1)) or fsdp_roots(model))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run forward+backward with (enabled) or without gradient synchronisation.

    Skipping the sync on non-final micro-batches saves K-1 reductions per window; the final
    backward then reduces the accumulated sum once. Under torch.compile the switch is the
    wrapper's inside the compiled module.
    """
    model = unwrap_compiled(model)
    if enabled:
        yield
        return
    if isinstance(model, DistributedDataParallel) or (FSDP1 and isinstance(model, FSDP1)):
        with model.no_sync():
            yield
        return
    roots = fsdp_roots(model)
    for root in roots:
        root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for root in roots:
            root.set_requires_gradient_sync(True)


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); return whether we did."""
    import os

    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def wrap(module: nn.Module, fsdp: bool, device: torch.device) -> nn.Module:
    """DDP by default, FSDP2 (`fully_shard` per decoder layer, then the root) with fsdp=True."""
    if not is_distributed() or world_size() == 1:
        return module
    if not fsdp:
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for child in module.modules():
        if isinstance(child, nn.ModuleList):  # the decoder layers of HF-style models
            for layer in child:
                fully_shard(layer)
    fully_shard(module)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    module = unwrap_compiled(module)
    return module.module if isinstance(module, DistributedDataParallel) else module


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def any_rank(flag: int | None) -> int | None:
    """The first non-None value of `flag` over ranks (e.g. a signal number), so all ranks agree.

    One scalar all-reduce per call when distributed: the loop calls it once per window so
    that every rank stops after the same window.
    """
    if not is_distributed() or world_size() == 1:
        return flag
    value = torch.tensor([flag or 0], dtype=torch.int64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value) or None


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Full (unsharded) model and optimizer state of an FSDP2 model, on the CPU. Collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state, optimizer_state) -> None:
    """Shard full state dicts (as saved by `full_state_dicts`) back into an FSDP2 model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)  # tied weights are stored once
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state, options=options)
