"""HF `Trainer` and TRL's `SFTTrainer`, made exactly the big batch for any model.

    from gradaccum.hf import make_exact
    trainer = make_exact(SFTTrainer(model=..., args=..., train_dataset=...))
    trainer.train()

transformers' Trainer is exact only when the model hands `num_items_in_batch` on to its loss, and
its count matches what that loss divides. Many heads take **kwargs and drop the count (BART,
XLNet, Whisper causal LMs; most sequence-classification heads, Llama's included); Trainer then
also skips its division by the accumulation steps and each optimizer step is the *sum* of the
micro-batch means, about K times the gradient. Others honour the count while Trainer counts the
unshifted labels (GPT-2), which scales every step by shifted/unshifted tokens.

make_exact stops relying on the model's forward. Per window of micro-batches it

1. counts the targets in `get_batch_samples` (Trainer's own window batching, so the partial last
   window of an epoch and resuming mid-epoch are Trainer's), summed over ranks, before any forward;
2. in `compute_loss` (training only) runs the model *without* labels and takes the summed loss of
   its logits, divided by that count and multiplied by the world size under DDP, which averages;
   `training_step` is told the loss is already scaled, so Trainer divides by nothing. For plain
   causal LMs the LM head is swapped, for that forward, for a chunked cross-entropy that never
   builds the [tokens, vocab] logits (`head.py`); other models use the full logits;
3. skips a window without targets: no forward, no optimizer or scheduler step, no log line.

Which loss is "the big batch" is the trainer's own, and make_exact checks it rather than assuming
(`probe.py`): a loss that is not a mean of per-target terms of the logits is refused.
"""

from .trainer import ExactTrainer, make_exact

__all__ = ["make_exact", "ExactTrainer"]
