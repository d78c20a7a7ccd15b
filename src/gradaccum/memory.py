"""Peak-memory measurement (bytes), and the micro-batch finder behind `--micro-batch-size auto`.

`find_micro_batch_size` picks the largest micro-batch that fits a memory budget *and divides the
per-rank batch*, so that accumulation steps = B / (micro x world) keep the effective batch exactly B.
(HF's `auto_find_batch_size` halves the micro-batch on OOM without rescaling accumulation, which
silently halves the effective batch: transformers PR #33281.)

How a micro-batch size is measured -- one *probe*:
  - the batch is the m longest examples of the data (every micro-batch of a run is at most this
    wide, since windows are cut into length-sorted micro-batches), run through the real loss
    module with the real autocast;
  - the gradients are first set to zeros, as they are on every micro-batch after the first of a
    window, so the probe sees the steady state: parameters + gradients + activations + the
    transient gradients of the backward;
  - CPU: the peak is the process's resident high-water mark (VmHWM), reset just before the probe
    through /proc/self/clear_refs ("5", Linux >= 4.0). No subprocess, no fork, no tracing: it sees
    every allocation, torch's and everyone else's, intra-op temporaries included, at zero cost.
    Where the reset is not possible the monotonic ru_maxrss is used, which can only overestimate.
    CUDA: the caching allocator's peak (`max_memory_allocated`) after `reset_peak_memory_stats`, and
    an out-of-memory error counts as "does not fit".
  - the optimizer state does not exist yet, so it is added: 2 x the trainable parameter bytes
    (AdamW's exp_avg and exp_avg_sq, in the parameters' dtype);
  - the optimizer step runs after the activations are gone. torch's for-loop and for-each AdamW
    allocate temporaries of up to 2 x the largest parameter there, which for small micro-batches
    makes the step, not the backward, the peak; they are counted on top of the memory held after
    the probe's backward. `gradaccum train` steps a fused AdamW, which allocates none, so for it the
    term is a margin; it keeps the prediction safe for loops that step the default AdamW.
  - activation checkpointing: the probe runs the model as it will train, so a model with checkpointing
    switched on (models.enable_gradient_checkpointing) is measured with it -- its layers recompute in
    the probe's backward and keep only their inputs. `gradient_checkpointing=True/False` switches it
    on or off for the probes only.
  - `reserved_bytes` is memory the run will hold that no probe sees, e.g. the CPU snapshot of a
    background checkpoint save (async_save.AsyncSaver: the weights and optimizer state once more).
Predicted training peak(m) = max(probe peak(m), after-backward + step temporaries) + optimizer state
+ reserved; m fits when that is at most 85% of the budget: over a whole run of many micro-batches
allocator fragmentation adds to what one probe sees (how much: benchmarks/README.md, "The micro-batch
finder"). On the CPU the RSS a probe reads also depends on the allocator's history, which only
makes it read high.

The search never probes a size predicted not to fit (on the CPU an oversized probe is not an
exception but the kernel's OOM killer): it probes m = 1 and the next divisor, fits peak(m) = a + b m,
probes the largest divisor predicted to fit, and steps down (re-fitting) until a probe confirms one.
That is 2-4 forward+backward passes, the largest of them the size the run will use anyway.

Afterwards the model is as it was: parameters untouched (no optimizer step), buffers restored,
gradients restored (None in the training loop), RNG states restored so dropout draws the same
masks as a run with a fixed micro-batch size.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .config import parse_size
from .errors import ConfigError

__all__ = [
    "peak_rss_bytes",
    "peak_memory_bytes",
    "current_rss_bytes",
    "reset_peak_rss",
    "parse_size",
    "format_size",
    "default_budget_bytes",
    "find_micro_batch_size",
    "predicted_peaks",
    "search_micro_batch_size",
    "MicroBatchSearch",
]

# The resident high-water mark before this process last reset it, so that reported peaks stay
# whole-process peaks after a reset (the finder resets it before every probe).
_peak_before_reset = 0


def current_rss_bytes() -> int:
    """Resident set size now (Linux: /proc/self/statm); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark to its current RSS; False where impossible.

    Linux >= 4.0 (/proc/self/clear_refs "5"). `peak_rss_bytes` keeps reporting the whole-process peak.
    """
    global _peak_before_reset
    before = max(_ru_maxrss_bytes(), _vm_hwm_bytes() or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _peak_before_reset = max(_peak_before_reset, before)
    return _vm_hwm_bytes() is not None


def _release_free_memory() -> None:
    """Hand memory that malloc keeps after frees back to the kernel (glibc only; a no-op elsewhere).

    Without it a probe's freed activations stay resident, so the next probe would start from a higher
    RSS and the training run would carry the largest probe's memory as dead weight."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _window_peak_rss_bytes() -> int:
    """Resident high-water mark since the last reset (or since the start)."""
    hwm = _vm_hwm_bytes()
    return hwm if hwm is not None else _ru_maxrss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (resets by `reset_peak_rss` excluded)."""
    return max(_ru_maxrss_bytes(), _peak_before_reset)


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak accelerator memory allocated by torch on CUDA; peak process RSS on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


# ---------------------------------------------------------------------------------------------
# Sizes

def format_size(num_bytes: float) -> str:
    """1536 MiB -> '1.50 GiB'; binary units, three significant digits."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_room_bytes() -> int | None:
    """What this process's memory cgroup still allows, plus our own RSS; None when unlimited."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and limit < 2 ** 60 and usage is not None:
            return max(0, limit - usage) + current_rss_bytes()
    return None


def default_budget_bytes(device: torch.device | str = "cpu", fraction: float = 0.8) -> int:
    """The budget when none is given: CUDA, the device's total memory; CPU, `fraction` of the memory
    this process can have -- what the kernel reports available (/proc/meminfo MemAvailable, or a
    tighter cgroup limit) plus what it already holds."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    available = None
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match:
            available = int(match.group(1)) * 1024 + current_rss_bytes()
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            raise ConfigError("cannot tell how much memory this machine has: pass --memory-budget") from None
    room = _cgroup_room_bytes()
    if room is not None:
        available = min(available, room)
    return int(fraction * available)


# ---------------------------------------------------------------------------------------------
# The search, separated from the measuring so it can be tested with any `probe`


@dataclass
class MicroBatchSearch:
    """What the finder did: every probe, and the choice."""

    micro_batch_size: int
    candidates: list[int]  # the divisors of the per-rank batch, ascending
    limit_bytes: int  # headroom x budget
    budget_bytes: int
    probes: dict[int, int | None] = field(default_factory=dict)  # m -> predicted peak (None: OOM)
    predicted_bytes: int | None = None  # predicted peak at the chosen size

    def fits(self, m: int) -> bool:
        peak = self.probes.get(m)
        return peak is not None and peak <= self.limit_bytes


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending."""
    if n < 1:
        raise ValueError(f"need a positive integer, got {n}")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def search_micro_batch_size(candidates: Sequence[int], probe: Callable[[int], int | None], limit_bytes: int,
                            budget_bytes: int | None = None) -> MicroBatchSearch:
    """The largest candidate whose measured peak `probe(m)` is <= limit_bytes (probe returns None
    for out-of-memory). Never probes a candidate that an affine fit of the measured peaks predicts
    not to fit; raises ValueError when even the smallest candidate does not fit."""
    candidates = sorted(set(candidates))
    result = MicroBatchSearch(candidates[0], list(candidates), limit_bytes, budget_bytes or limit_bytes)

    def measure(m: int) -> bool:
        if m not in result.probes:
            result.probes[m] = probe(m)
        return result.fits(m)

    if not measure(candidates[0]):
        peak = result.probes[candidates[0]]
        need = "runs out of memory" if peak is None else f"needs about {format_size(peak)}"
        raise ConfigError(f"--micro-batch-size auto: even a micro-batch of {candidates[0]} {need}, more than the "
                         f"{format_size(limit_bytes)} the memory budget allows; raise --memory-budget, "
                         f"lower --max-length, use --lora, or --gradient-checkpointing (if it is off)")
    best = 0  # index of the largest candidate known to fit
    if len(candidates) > 1 and measure(candidates[1]):
        best = 1
    while best + 1 < len(candidates):
        m1, p1 = candidates[best], result.probes[candidates[best]]
        # Sizes above the largest that fits which were measured not to: the search stays below them.
        failed = [m for m in candidates[best + 1:] if m in result.probes and not result.fits(m)]
        ceiling = min(failed) if failed else math.inf
        # peak(m) ~ a + b*m: the slope from the largest fitting size to the smallest failed one when that
        # was measured (interpolation), else from the smallest probe to the largest fitting one.
        if failed and result.probes[ceiling] is not None:
            slope = (result.probes[ceiling] - p1) / (ceiling - m1)
        else:
            m0, p0 = candidates[0], result.probes[candidates[0]]
            slope = (p1 - p0) / (m1 - m0) if m1 > m0 else 0.0
        if slope <= 0:
            # One point, or flat measurements (noise): at most double instead of extrapolating.
            target = max((m for m in candidates if m1 < m <= 2 * m1 and m < ceiling), default=None)
        else:
            target = max((m for m in candidates if m1 < m < ceiling and p1 + slope * (m - m1) <= limit_bytes),
                         default=None)
        if target is None:
            break
        if measure(target):
            best = candidates.index(target)
    result.micro_batch_size = candidates[best]
    result.predicted_bytes = result.probes[candidates[best]]
    return result


# ---------------------------------------------------------------------------------------------
# The probe


def _probe_batch(examples: Sequence[Any], m: int, pad_token_id: int, order: list[int]) -> dict[str, torch.Tensor]:
    from .data import collate

    chosen = [examples[order[i % len(order)]] for i in range(m)]
    return collate(chosen, pad_token_id)


def _trainable_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@contextlib.contextmanager
def _preserved_state(module: torch.nn.Module, device: torch.device):
    """Restore gradients, buffers, RNG states and the training flag afterwards."""
    params = _trainable_params(module)
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield params
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        for m, training in modes:
            m.training = training


def _make_probe(loss_module: torch.nn.Module, examples: Sequence[Any], pad_token_id: int, device: torch.device,
                autocast: Callable[[], Any], params: list[torch.nn.Parameter],
                extra_bytes: int) -> Callable[[int], int | None]:
    step_temporary_bytes = 2 * max((p.numel() * p.element_size() for p in params), default=0)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids),
                                                         sum(t != -100 for t in examples[i].labels)), reverse=True)

    def probe(m: int) -> int | None:
        batch = _probe_batch(examples, m, pad_token_id, order)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = None
        try:
            # The steady state of a window: gradients already exist when a micro-batch backpropagates.
            for p in params:
                p.grad = torch.zeros_like(p)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            else:
                reset_peak_rss()
            with autocast():
                loss = loss_module(batch["input_ids"], batch["attention_mask"], batch["labels"])
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak, after = int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.memory_allocated(device))
            else:
                peak, after = _window_peak_rss_bytes(), current_rss_bytes()
            # The optimizer step comes later, with parameters and gradients resident and the activations
            # gone: AdamW's state plus its temporaries (see the module docstring) may peak above the
            # backward for small micro-batches.
            peak = max(peak, after + step_temporary_bytes)
        except torch.cuda.OutOfMemoryError:
            peak = None
        except RuntimeError as error:  # the CPU allocator, where the kernel refuses memory
            if "can't allocate memory" not in str(error):
                raise
            peak = None
        finally:
            del loss, batch
            for p in params:
                p.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            else:
                _release_free_memory()
        return None if peak is None else peak + extra_bytes

    return probe


@contextlib.contextmanager
def _checkpointing(loss_module: torch.nn.Module, wanted: bool | None):
    """Activation checkpointing on (True) or off (False) for the probes, as it was afterwards; None: as it is."""
    from .models import disable_gradient_checkpointing, enable_gradient_checkpointing, gradient_checkpointing_enabled

    model = getattr(loss_module, "model", loss_module)  # CausalLMLoss holds the model it runs
    if wanted is None or wanted == gradient_checkpointing_enabled(model):
        yield
        return
    (enable_gradient_checkpointing if wanted else disable_gradient_checkpointing)(model)
    try:
        yield
    finally:
        (disable_gradient_checkpointing if wanted else enable_gradient_checkpointing)(model)


@contextlib.contextmanager
def _probing(loss_module: torch.nn.Module, examples: Sequence[Any], config: Any, device: torch.device,
             pad_token_id: int, gradient_checkpointing: bool | None = None, reserved_bytes: int = 0):
    """A `probe(m) -> predicted training peak bytes (None: OOM)`, with the model's state restored after."""
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
        if getattr(config, "dtype", None) == "bfloat16" else contextlib.nullcontext
    if gradient_checkpointing is None:
        gradient_checkpointing = getattr(config, "gradient_checkpointing", None)
    with _preserved_state(loss_module, device) as params, _checkpointing(loss_module, gradient_checkpointing):
        # AdamW keeps two tensors per trainable parameter, allocated at its first step.
        optimizer_bytes = 2 * sum(p.numel() * p.element_size() for p in params)
        yield _make_probe(loss_module, examples, pad_token_id, device, autocast, params,
                          optimizer_bytes + reserved_bytes)


def predicted_peaks(loss_module: torch.nn.Module, examples: Sequence[Any], sizes: Sequence[int], config: Any = None,
                    device: torch.device | str = "cpu", pad_token_id: int = 0, *,
                    gradient_checkpointing: bool | None = None, reserved_bytes: int = 0) -> dict[int, int | None]:
    """The finder's predicted training peak (bytes; None: out of memory) for each micro-batch size in
    `sizes`, probed in that order with no search -- for benchmarks that check the predictions.
    `gradient_checkpointing`: probe with activation checkpointing on / off (None: as the model is)."""
    with _probing(loss_module, examples, config, torch.device(device), pad_token_id, gradient_checkpointing,
                  reserved_bytes) as probe:
        return {m: probe(m) for m in sizes}


def find_micro_batch_size(loss_module: torch.nn.Module, examples: Sequence[Any], config: Any,
                          device: torch.device | str, pad_token_id: int, *, reserved_bytes: int = 0) -> int:
    """The largest micro-batch size that divides the per-rank batch and fits the memory budget.

    `config` needs `batch_size` (B); it may have `memory_budget` (bytes or a string like "4GB"; default:
    `default_budget_bytes`), `dtype` ("bfloat16" probes under autocast, as the loop runs) and
    `gradient_checkpointing` (True/False: probe with activation checkpointing on/off; absent or None:
    as the model is). `reserved_bytes` is held by the run beside what a probe sees (a background
    checkpoint's snapshot). Under torch.distributed every rank probes and all take the smallest
    choice. Prints one line.
    """
    from . import distributed

    device = torch.device(device)
    batch_size = getattr(config, "batch_size", None)
    if not batch_size or batch_size < 1:
        raise ConfigError("--micro-batch-size auto needs --batch-size")
    if not examples:
        raise ConfigError("--micro-batch-size auto: no training examples to measure with")
    world = distributed.world_size()
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} is not a multiple of the world size {world}")
    per_rank = batch_size // world
    budget_value = getattr(config, "memory_budget", None)
    budget = parse_size(budget_value) if budget_value is not None else default_budget_bytes(device)
    headroom = 0.85  # see the module docstring
    limit = int(headroom * budget)

    with _probing(loss_module, examples, config, device, pad_token_id, reserved_bytes=reserved_bytes) as probe:
        result = search_micro_batch_size(divisors(per_rank), probe, limit, budget)
        from .models import gradient_checkpointing_enabled

        checkpointed = gradient_checkpointing_enabled(getattr(loss_module, "model", loss_module))

    chosen = result.micro_batch_size
    if distributed.is_distributed():
        import torch.distributed as dist

        value = torch.tensor([chosen], dtype=torch.int64,
                             device=device if dist.get_backend() == "nccl" else torch.device("cpu"))
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        chosen = int(value.item())  # the smallest of divisors of per_rank is one too
    measured = ", ".join(f"{m}: {'OOM' if p is None else format_size(p)}" for m, p in sorted(result.probes.items()))
    longest = max(len(e.input_ids) for e in examples)
    if distributed.is_main_process():
        print(f"micro-batch size auto: {chosen} (accumulation {per_rank // chosen} x world {world} -> batch "
              f"{batch_size}); predicted peak {format_size(result.probes.get(chosen) or 0)} of budget "
              f"{format_size(budget)} ({'device' if device.type == 'cuda' else 'RSS'}, {int(headroom * 100)}% "
              f"usable; probes of the longest examples, {longest} tokens"
              f"{', activation checkpointing on' if checkpointed else ''}: {measured})", flush=True)
    return chosen
