"""Sum-reduced token losses, and a chunked LM-head cross-entropy that never builds full logits.

Every loss here returns a *sum* over target tokens, never a mean: the division by
the number of targets belongs to the Accumulator, which alone knows the count of
the whole window over all ranks. A mean taken here would bake in the very
per-micro-batch normalisation that makes naive accumulation wrong.

At a 49,152-token vocabulary (SmolLM2) the `[tokens, vocab]` logits and their gradient
dominate activation memory. `linear_cross_entropy_sum` projects `chunk_size` tokens at a time
and takes each chunk's gradient during the forward, so no chunk is computed twice and no full
logits exist; `CausalLMLoss` uses it for plain HF causal LMs, projecting only the positions that
have a target.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


# Tokens per block of logits: the head holds DEFAULT_CHUNK_SIZE x vocab logits at a time (48 MiB in
# float32 at SmolLM2's 49,152). 256 instead of 1024 cut a 2,048-token step's peak by ~140 MiB under
# activation checkpointing at no measurable cost in time (benchmarks/results/long_head.md).
DEFAULT_CHUNK_SIZE = 256


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool = True):
    """Align logits with the labels they predict: position t predicts token t+1."""
    if shift_labels:
        return logits[..., :-1, :], labels[..., 1:]
    return logits, labels


def count_targets(labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True) -> int:
    """Number of target tokens in `labels` (after the causal shift when asked)."""
    if shift_labels:
        labels = labels[..., 1:]
    return int((labels != ignore_index).sum())


def count_target_sequences(labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True) -> int:
    """Number of sequences with at least one target token (the unit of normalize="samples")."""
    if shift_labels:
        labels = labels[..., 1:]
    return int((labels != ignore_index).reshape(labels.shape[0], -1).any(dim=1).sum())


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # Softmax over a 50k vocabulary in bf16/fp16 loses digits; float64 stays float64.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True
) -> torch.Tensor:
    """Sum of the cross-entropy of every target token. Shape: scalar. Units: nats."""
    logits, labels = shift_for_causal_lm(logits, labels, shift_labels)
    return F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


def sequence_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed loss [batch] and per-sequence target count [batch]."""
    logits, labels = shift_for_causal_lm(logits, labels, shift_labels)
    per_token = F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).reshape(labels.shape)
    mask = labels != ignore_index
    return per_token.reshape(labels.shape[0], -1).sum(dim=1), mask.reshape(labels.shape[0], -1).sum(dim=1)


def sequence_mean_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = True
) -> torch.Tensor:
    """Sum over sequences of each sequence's mean token loss (sequences without targets add 0)."""
    sums, counts = sequence_loss_sums(logits, labels, ignore_index, shift_labels)
    return (sums / counts.clamp(min=1).to(sums.dtype)).sum()


# ---------------------------------------------------------------------------------------------
# Chunked LM-head cross-entropy
# ---------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # The same rule as `_upcast`: half precisions compute the softmax in float32, float64 stays.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    # The projection runs in the input dtype, exactly as the model's nn.Linear head would, and
    # only its result is upcast: the same arithmetic as the unchunked path, row block by row block.
    return F.linear(hidden, weight, bias).to(dtype)


def _through_head(grad_logits: torch.Tensor, chunk: torch.Tensor, weight: torch.Tensor,
                  grad_hidden: torch.Tensor | None, start: int, grad_weight: torch.Tensor | None,
                  grad_bias: torch.Tensor | None) -> None:
    """Push one chunk's logit gradient [C, V] back through the head, adding into whichever of
    grad_hidden[start:start+C], grad_weight [V, H] and grad_bias [V] are wanted (not None)."""
    if grad_bias is not None:
        grad_bias += grad_logits.sum(dim=0)
    # The two matmuls run in the input dtype, as the head's own nn.Linear backward would.
    grad_logits = grad_logits.to(chunk.dtype)
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[start:start + chunk.shape[0]])
    if grad_weight is not None:
        if grad_logits.dtype == grad_weight.dtype:
            grad_weight.addmm_(grad_logits.t(), chunk)
        else:
            grad_weight += (grad_logits.t() @ chunk).to(grad_weight.dtype)


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T + bias, target_i), with the gradient taken in forward.

    The loss is a weighted *sum*, so its gradient is the scalar grad_output times a gradient that
    is fully known in forward: each chunk's `softmax - onehot` is formed right after its logits and
    pushed through the two backward matmuls at once. Backward only multiplies by grad_output. So the
    logits are computed once (no recompute: the same three matmuls as the plain head), and held one
    chunk at a time. What waits between forward and backward: grad_hidden [N, H] and the weight
    gradient [V, H] -- nothing runs between the head's forward and its backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, weights, chunk_size, need):
        need_hidden, need_weight, need_bias = need
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        dtype = _accumulation_dtype(hidden.dtype)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_bias else None
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk, chunk_targets = hidden[start:end], targets[start:end]
            logits = _chunk_logits(chunk, weight, bias, dtype)
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            # log-sum-exp inside the logits' own buffer (no second chunk x V block): shift each row by
            # its max, exponentiate in place, sum. The buffer then holds exp(logits - max).
            row_max = logits.amax(dim=1)
            sum_exp = logits.sub_(row_max[:, None]).exp_().sum(dim=1)
            losses = row_max + sum_exp.log() - target_logits
            total += losses.sum() if weights is None else (losses * weights[start:end]).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss_i / d logits_i = w_i * (softmax_i - onehot(target_i)), still in the same buffer.
            grad_logits = logits.div_(sum_exp[:, None])
            grad_logits[torch.arange(end - start, device=logits.device), chunk_targets] -= 1
            if weights is not None:
                grad_logits.mul_(weights[start:end, None])
            _through_head(grad_logits, chunk, weight, grad_hidden, start, grad_weight, grad_bias)
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        # The buffers are ours alone: scale in place, no second [V, H] tensor.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total.to(grad_weight.dtype)).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_total.to(grad_bias.dtype)).to(bias_dtype)
        return grad_hidden, grad_weight, None, grad_bias, None, None, None


def _prepare_head_inputs(name, hidden, weight, targets, bias, chunk_size):
    """Validate the LM-head inputs; cast them as autocast would cast the head's nn.Linear."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: need hidden [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    if targets.shape != (num_tokens,) or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"{name}: targets must be integer class indices of shape "
                         f"({num_tokens},), got {targets.dtype} {tuple(targets.shape)}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"{name}: bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be an integer >= 1, got {chunk_size!r}")

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Mirror autocast on the head's nn.Linear: float32/half inputs to the autocast dtype
        # (float64 is not autocast-eligible). The casts stay outside the Function, in autograd.
        autocast_dtype = torch.get_autocast_dtype(device_type)
        eligible = (torch.float32, torch.float16, torch.bfloat16)
        hidden, weight = (t.to(autocast_dtype) if t.dtype in eligible else t for t in (hidden, weight))
        if bias is not None and bias.dtype in eligible:
            bias = bias.to(autocast_dtype)
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"{name}: hidden, weight and bias must share one floating dtype, got "
                         f"{hidden.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")
    targets = targets.to(device=hidden.device, dtype=torch.long)
    if num_tokens and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"{name}: targets must lie in [0, {vocab}); select the target "
                         "positions (drop ignore_index) before calling")
    return hidden, weight, targets, bias


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """`sum_i weights_i * CE(hidden_i @ weight.T + bias, targets_i)` (weights default to 1): a scalar,
    without ever building the `[N, V]` logits or their gradient.

    hidden [N, H], weight [V, H], targets [N] (class indices, every one a target: select the
    positions first, there is no ignore_index), bias [V] or None. The sum is float32 for
    half-precision inputs (the softmax is taken in float32), else in the input dtype.

    The gradient is formed during the forward, chunk by chunk (`chunk_size x V` logits at a time),
    so each chunk's logits are computed once (the head's three matmuls, as in the plain path).
    Held from forward to backward: grad_hidden [N, H] and, for a trainable head, the weight
    gradient [V, H] in float32/float64; a frozen head (LoRA) costs no weight-gradient work. Under
    no_grad, or with nothing requiring a gradient, only the loss is computed.
    """
    hidden, weight, targets, bias = _prepare_head_inputs("linear_cross_entropy_sum", hidden, weight, targets,
                                                         bias, chunk_size)
    if weights is not None:
        if weights.shape != targets.shape or not weights.is_floating_point():
            raise ValueError(f"linear_cross_entropy_sum: weights must be floating point of shape "
                             f"{tuple(targets.shape)}, got {weights.dtype} {tuple(weights.shape)}")
        weights = weights.detach().to(device=hidden.device, dtype=_accumulation_dtype(hidden.dtype))
    grad = torch.is_grad_enabled()
    need = (grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropySum.apply(hidden, weight, targets, bias, weights, chunk_size, need)


# ---------------------------------------------------------------------------------------------
# CUDA kernels, when installed
# ---------------------------------------------------------------------------------------------


def _on_cuda(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda"


def cuda_kernel_name() -> str | None:
    """The installed fused LM-head CE kernel for CUDA: "cut_cross_entropy", "liger" or None."""
    import importlib.util

    for name, module in (("cut_cross_entropy", "cut_cross_entropy"), ("liger", "liger_kernel")):
        if importlib.util.find_spec(module) is not None:
            return name
    return None


def _cuda_kernel_sum(name: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(hidden_i @ weight.T, targets_i) through Cut Cross Entropy or Liger (CUDA, Triton)."""
    if name == "cut_cross_entropy":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, reduction="sum")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)
    return loss[0] if isinstance(loss, tuple) else loss


# ---------------------------------------------------------------------------------------------
# The model and its loss in one forward
# ---------------------------------------------------------------------------------------------

# Causal LMs whose forward is exactly `logits = self.lm_head(self.model(...).last_hidden_state)`
# (checked against transformers 5.x). Families that touch the logits after the head (Cohere's
# logit_scale, Granite's logits_scaling, Gemma 2/3's final softcapping, ...) are not listed and take
# the plain path. A subclass that overrides `forward` is not trusted either.
_CHUNKABLE_CAUSAL_LMS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "PhiForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "GemmaForCausalLM", "SmolLM3ForCausalLM",
    "Starcoder2ForCausalLM",
})
# Config fields that, where a model reads them, change the logits after the head.
_LOGIT_TRANSFORM_FIELDS = ("logit_scale", "logits_scaling", "final_logit_softcapping", "output_multiplier_scale",
                           "lm_head_multiplier", "logit_multiplier", "mup_width_scale")


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _chunkable_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | str:
    """(decoder, lm_head) when the chunked path reproduces `model(...).logits` exactly, else why not."""
    if _has_hooks(model):
        return "the model has forward hooks that the chunked path would bypass"
    base = model
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # a peft model
        peft_config = getattr(model, "active_peft_config", None)
        peft_type = str(getattr(getattr(peft_config, "peft_type", None), "value", None))
        if peft_type != "LORA" or getattr(peft_config, "alora_invocation_tokens", None) is not None:
            return f"peft adapter type {peft_type} changes the model's forward beyond its layers"
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, torch.nn.Module) and _has_hooks(tuner):
            return "the peft model has forward hooks that the chunked path would bypass"
        base = model.get_base_model()
        if _has_hooks(base):
            return "the model has forward hooks that the chunked path would bypass"
    known = next((cls for cls in type(base).__mro__ if cls.__name__ in _CHUNKABLE_CAUSAL_LMS
                  and cls.__module__.startswith("transformers.models.")), None)
    if known is None:
        return f"{type(base).__name__} is not a causal LM with a known plain head"
    if type(base).forward is not known.forward:
        return f"{type(base).__name__} overrides the forward of {known.__name__}"
    config = getattr(base, "config", None)
    for field in _LOGIT_TRANSFORM_FIELDS:
        value = getattr(config, field, None)
        if value is not None and value != 1:
            return f"config.{field}={value!r} transforms the logits"
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(decoder, torch.nn.Module):
        return f"{type(base).__name__} has no decoder at .model"
    if type(head) is not torch.nn.Linear or _has_hooks(head):
        # e.g. a LoRA-adapted or FSDP-sharded head: its own forward does more than weight @ x.
        return f"the output embedding is a {type(head).__name__}, not a plain nn.Linear"
    return decoder, head


def _logits_of(output) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    raise ValueError(f"CausalLMLoss: the model returned {type(output).__name__}; expected a logits tensor "
                     "[batch, time, vocab] or an output with a .logits tensor")


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its summed loss in one forward.

    Data-parallel wrappers (DDP, FSDP2) only see work done inside `forward`, so the
    loss is computed here rather than on logits handed back to the loop.
    Returns the *summed* loss: token losses (normalize="tokens") or per-sequence means
    (normalize="samples"); the Accumulator divides by the global count.

    With chunked=True (the default) and a plain HF causal LM (Llama, Mistral, Qwen2/3, Phi,
    Gemma 1, OLMo, SmolLM3, Starcoder2; bare or with peft LoRA on its inner layers), the loss
    is computed from the decoder's hidden states: only positions with a target are projected,
    through `linear_cross_entropy_sum`, so neither the `[B, T, V]` logits nor their gradient ever
    exist. Every other model takes the plain path on `model(...).logits` -- any module that
    returns a logits tensor or an output with `.logits` -- with the same result;
    `uses_chunked_path` and `fallback_reason` say which path was taken and why.

    On CUDA with kernel="auto", the chunked path hands the selected hidden states to Cut Cross
    Entropy or Liger's fused linear cross-entropy when one is installed (token sums, no head bias);
    a failing kernel warns once and the built-in path takes over. `head_kernel` names the choice.
    """

    def __init__(self, model: torch.nn.Module, normalize: str = "tokens", ignore_index: int = -100,
                 chunked: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE, kernel: str = "auto"):
        super().__init__()
        if normalize not in ("tokens", "samples"):
            raise ValueError(f"normalize must be 'tokens' or 'samples', got {normalize!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.model = model
        self.normalize = normalize
        self.ignore_index = ignore_index
        self.chunked = chunked
        self.chunk_size = chunk_size
        if kernel not in ("auto", "torch"):
            raise ValueError(f"kernel must be 'auto' or 'torch', got {kernel!r}")
        # "auto": on CUDA, Cut Cross Entropy or Liger when installed (token sums, no bias); else ours.
        self.kernel = kernel
        self._cuda_kernel = cuda_kernel_name() if kernel == "auto" else None

    @property
    def fallback_reason(self) -> str | None:
        """Why the plain logits path is used (None when the chunked path is)."""
        if not self.chunked:
            return "chunked=False"
        parts = _chunkable_parts(self.model)
        return parts if isinstance(parts, str) else None

    @property
    def head_kernel(self) -> str:
        """"plain" (full logits), "chunked" (built-in), or the CUDA kernel used on CUDA inputs."""
        if not self.uses_chunked_path:
            return "plain"
        return f"chunked; {self._cuda_kernel} on CUDA" if self._cuda_kernel else "chunked"

    @property
    def uses_chunked_path(self) -> bool:
        return self.fallback_reason is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Summed loss of a padded batch, or of a packed one (`data.pack`: attention_mask None and
        position_ids restarting at each sequence; normalize="tokens" only, as a row is not a sequence)."""
        # Resolved on every call (a few attribute lookups) rather than cached: the submodules
        # must not be stored on self, where they would be registered a second time.
        parts = _chunkable_parts(self.model) if self.chunked else "chunked=False"
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            if self.normalize == "samples":
                raise ValueError("CausalLMLoss: packed batches (position_ids) need normalize='tokens'")
            # use_cache=False matters beyond memory: HF reads position_ids as packed sequences only when
            # no KV cache is passed, and with use_cache=True the model makes itself one.
            inputs.update(position_ids=position_ids, use_cache=False)
        if isinstance(parts, str):
            logits = _logits_of(self.model(**inputs))
            if self.normalize == "samples":
                return sequence_mean_sum(logits, labels, self.ignore_index)
            return token_loss_sum(logits, labels, self.ignore_index)

        decoder, head = parts
        # use_cache=False: training never reads a KV cache, and building one only holds memory.
        hidden = decoder(**{**inputs, "use_cache": False}).last_hidden_state
        # Position t predicts label t+1; select the targets *before* the head, so padding and
        # prompt positions are never projected onto the vocabulary.
        shifted = labels[:, 1:].to(hidden.device)
        mask = shifted != self.ignore_index
        rows, cols = mask.nonzero(as_tuple=True)
        # The head's parameters are read here, inside this forward, so that DDP and FSDP2
        # (which wrap this module) see them used and (FSDP2) unsharded.
        selected, targets, weights = hidden[rows, cols], shifted[rows, cols], None
        if self.normalize == "samples":
            # Each sequence's mean: every target token of sequence b weighs 1 / (its targets).
            weights = 1.0 / mask.sum(dim=1).clamp(min=1).to(torch.float64)[rows]
        if self._cuda_kernel and weights is None and head.bias is None and _on_cuda(hidden):
            try:
                return _cuda_kernel_sum(self._cuda_kernel, selected, head.weight, targets)
            except (ImportError, RuntimeError, TypeError, ValueError) as exc:  # an API or build mismatch
                warnings.warn(f"CausalLMLoss: the {self._cuda_kernel} kernel failed ({exc}); using the "
                              "built-in chunked cross-entropy from now on", stacklevel=2)
                self._cuda_kernel = None
        return linear_cross_entropy_sum(selected, head.weight, targets, head.bias, weights, self.chunk_size)
