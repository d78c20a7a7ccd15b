"""gradaccum.hf: HF Trainer and TRL SFTTrainer, made exact, equal the big batch for any head.

Each test trains the same float64 model on the same windows three ways: make_exact with
accumulation k x m, make_exact with 1 x km (the big batch), and, where it departs, the plain
trainer with k x m (the control). The windows hold examples with 1 to 20 targets each, and the
last window of the epoch is partial (12 examples, windows of 8).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

from gradaccum.hf import ExactTrainer, make_exact

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

VOCAB = 100
EXAMPLES = 12  # windows of 8: 8 and a partial 4
LR = 0.5


@pytest.fixture(autouse=True, scope="module")
def frozen_heap():
    """Trainer.train() starts with gc.collect(); over the objects of torch, transformers and TRL that
    takes ~0.5 s a run. Frozen, they are left out, and each collection sees only the new objects."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


# ---------------------------------------------------------------------------------------------
# Models, data, runs


def llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", pad_token_id=0)
    return LlamaConfig(**{**fields, **overrides})


def causal_lm(name: str):
    """Tiny float64 LMs: `bart` (causal) drops num_items_in_batch and expects unshifted labels, `llama`
    honours it, `gpt2` honours it while Trainer counts unshifted labels, `peft` is Llama with LoRA;
    `t5` is an encoder-decoder (the labels go to the decoder, unshifted) that drops it."""
    torch.manual_seed(0)
    if name == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                                                    pad_token_id=0))
    elif name == "bart":
        from transformers import BartConfig, BartForCausalLM

        model = BartForCausalLM(BartConfig(vocab_size=VOCAB, d_model=32, decoder_layers=2, encoder_layers=2,
                                           decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=64,
                                           encoder_ffn_dim=64, is_decoder=True, is_encoder_decoder=False,
                                           pad_token_id=0, dropout=0.0, attention_dropout=0.0))
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                           eos_token_id=2))
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(llama_config())
        if name == "peft":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))
    return model.to(torch.float64)


def lm_examples(n: int = EXAMPLES, seed: int = 0, empty: range = range(0)):
    """Examples with 1..20 next-token targets; a prompt of 0..3 tokens is masked. With no prompt the
    first label is set too, which only an unshifted count counts. Examples in `empty` have no target."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(n):
        targets = int(torch.randint(1, 21, (1,), generator=g))
        prompt = int(torch.randint(0, 4, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (prompt + targets + (prompt == 0),), generator=g).tolist()
        labels = [-100] * prompt + ids[prompt:]
        examples.append({"input_ids": ids, "labels": [-100] * len(ids) if index in empty else labels})
    return examples


def collate(features):
    """Right padding; a float label (regression, multi-label) becomes float64."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, f in enumerate(features):
        input_ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        attention_mask[row, : len(f["input_ids"])] = 1
    if isinstance(features[0]["labels"], list) and len(features[0]["labels"]) == len(features[0]["input_ids"]):
        labels = torch.full_like(input_ids, -100)
        for row, f in enumerate(features):
            labels[row, : len(f["labels"])] = torch.tensor(f["labels"])
    else:
        labels = torch.tensor([f["labels"] for f in features])
        labels = labels.double() if labels.is_floating_point() else labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def training_args(tmp_path, micro_batch_size: int, accumulation_steps: int, **overrides):
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro_batch_size,
                  gradient_accumulation_steps=accumulation_steps, num_train_epochs=1, lr_scheduler_type="constant",
                  use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                  logging_steps=1, train_sampling_strategy="sequential", remove_unused_columns=False,
                  max_grad_norm=0.0, log_level="error")
    return TrainingArguments(**{**fields, **overrides})


def sgd(model, lr=LR):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def train(initial, data, tmp_path, micro_batch_size: int, accumulation_steps: int, exact: bool | str = True,
          optimizer=sgd, data_collator=collate, trainer_class=Trainer, normalize="auto", chunked=True, **overrides):
    """Train a copy of `initial`; exact=True: make_exact, "class": ExactTrainer, False: the plain trainer."""
    model = copy.deepcopy(initial)
    args = training_args(tmp_path, micro_batch_size, accumulation_steps, **overrides)
    kwargs = dict(model=model, args=args, train_dataset=data, data_collator=data_collator,
                  optimizers=(optimizer(model), None))
    if exact == "class":
        trainer = ExactTrainer(normalize=normalize, chunked=chunked, **kwargs)
    else:
        trainer = trainer_class(**kwargs)
        if exact:
            make_exact(trainer, normalize=normalize, chunked=chunked)
    trainer.train()
    return model, logged_losses(trainer), trainer


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def own_loss_reference(initial, data, window: int, optimizer=sgd, loss_of=None, linear_decay=False):
    """The big batch by hand: one step per window on the model's own loss of the whole window
    (linear_decay: the learning rate of HF's "linear" schedule, stepped with the optimizer)."""
    model = copy.deepcopy(initial)
    opt = optimizer(model)
    windows = -(-len(data) // window)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, (windows - t) / windows) if linear_decay
                                                 else 1.0)
    losses = []
    for start in range(0, len(data), window):
        batch = collate(data[start:start + window])
        loss = loss_of(model, batch) if loss_of else model(**batch).loss
        if not bool((batch["labels"] != -100).any()):
            continue  # the big batch has no such window
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model, losses


def params(model):
    return [p.detach() for p in model.parameters()]


def relative_error(model, reference, initial) -> float:
    """||w - w_ref|| / ||w_ref - w_0||: the error relative to the update itself."""
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(params(model), params(reference)))
    update = sum(float((b - c).pow(2).sum()) for b, c in zip(params(reference), params(initial)))
    return (diff / update) ** 0.5


def close_losses(a, b, tol=1e-6):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# transformers.Trainer


# plain Trainer's error against the big batch, at GA 4 x 2 vs 1 x 8 (None: it is aligned)
LMS = {"bart": 1.0, "llama": None, "gpt2": 1e-3, "peft": None, "t5": 1.0}


@pytest.mark.parametrize("name", list(LMS))
def test_lm_exact_where_plain_trainer_departs(tmp_path, name):
    initial = causal_lm(name)
    data = lm_examples()
    big, big_losses, _ = train(initial, data, tmp_path, 8, 1)
    exact, exact_losses, trainer = train(initial, data, tmp_path, 2, 4, exact="class" if name == "llama" else True)
    plain, plain_losses, _ = train(initial, data, tmp_path, 2, 4, exact=False)
    own, own_losses = own_loss_reference(initial, data, 8)

    assert relative_error(exact, big, initial) <= 1e-9
    # make_exact's big batch is the model's own loss (HF's causal-LM loss rounds through float32).
    assert trainer._gradaccum.objective.shift == (name in ("llama", "gpt2", "peft"))
    assert (trainer._gradaccum.head_path == "chunked") == (name in ("llama", "peft")), trainer._gradaccum.head_path
    assert relative_error(big, own, initial) <= 1e-6
    assert close_losses(exact_losses, own_losses) and len(exact_losses) == 2
    plain_error = relative_error(plain, own, initial)
    if LMS[name] is None:
        assert plain_error <= 1e-6
    else:
        assert plain_error > LMS[name]
        assert not close_losses(plain_losses, own_losses, tol=1e-3)


class CountlessTrainer(Trainer):
    """Trainer as for a model whose forward takes no **kwargs: no count reaches the loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False


@pytest.mark.parametrize("name", ["llama", "peft"])
def test_chunked_lm_head_never_builds_training_logits(tmp_path, monkeypatch, name):
    """Llama (and Llama with LoRA): the training loss comes from the chunked head inside the model's
    forward; the LM head never projects the hidden states onto the vocabulary with a gradient. The
    result is the big batch of the full-logits path, and of the model's own loss."""
    initial, data = causal_lm(name), lm_examples()
    head_type = type(initial.get_output_embeddings())
    full_projections = []  # (shape of the hidden states, grad enabled) of every call of the real head
    linear_forward = torch.nn.Linear.forward

    def recording(self, hidden):
        if self.out_features == VOCAB and type(self) is head_type:
            full_projections.append((tuple(hidden.shape), torch.is_grad_enabled()))
        return linear_forward(self, hidden)

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    exact, exact_losses, trainer = train(initial, data, tmp_path, 2, 4)
    assert trainer._gradaccum.head_path == "chunked"
    assert full_projections and not any(grad for _, grad in full_projections)  # only the first window's probe
    assert all(shape[0] == 1 for shape, _ in full_projections)  # the probe's one row

    full_projections.clear()
    big, _, full_trainer = train(initial, data, tmp_path, 8, 1, chunked=False)
    assert full_trainer._gradaccum.head_path == "full logits: chunked=False"
    assert sum(grad for _, grad in full_projections) == 2  # the control: one full projection per window
    monkeypatch.undo()

    own, own_losses = own_loss_reference(initial, data, 8)
    countless, _, _ = train(initial, data, tmp_path, 2, 4, exact=False, trainer_class=CountlessTrainer)
    assert relative_error(exact, big, initial) <= 1e-9
    assert relative_error(exact, own, initial) <= 1e-6  # HF's causal-LM loss rounds through float32
    assert close_losses(exact_losses, own_losses)
    assert relative_error(countless, own, initial) > 0.1  # the mean of micro-batch means


def seq_examples(problem_type: str, num_labels: int):
    g = torch.Generator().manual_seed(1)
    examples = []
    for index, example in enumerate(lm_examples(seed=2)):
        if problem_type == "single_label_classification":  # every third example has no label
            label = -100 if index % 3 == 0 else int(torch.randint(0, num_labels, (1,), generator=g))
        elif problem_type == "regression":
            label = float(torch.randn(1, generator=g))
        else:
            label = (torch.rand(num_labels, generator=g) > 0.5).double().tolist()
        examples.append({"input_ids": example["input_ids"], "labels": label})
    return examples


@pytest.mark.parametrize("problem_type,num_labels", [("single_label_classification", 3), ("regression", 1),
                                                      ("multi_label_classification", 3)])
def test_sequence_classification_exact(tmp_path, problem_type, num_labels):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    initial = LlamaForSequenceClassification(llama_config(num_labels=num_labels)).to(torch.float64)
    data = seq_examples(problem_type, num_labels)
    big, big_losses, _ = train(initial, data, tmp_path, 8, 1, optimizer=lambda m: sgd(m, 0.1))
    exact, exact_losses, _ = train(initial, data, tmp_path, 2, 4, optimizer=lambda m: sgd(m, 0.1))
    own, own_losses = own_loss_reference(initial, data, 8, optimizer=lambda m: sgd(m, 0.1))
    assert relative_error(exact, big, initial) <= 1e-9
    assert relative_error(big, own, initial) <= 1e-9
    assert close_losses(exact_losses, own_losses)
    if problem_type == "single_label_classification":  # the control: Llama's head drops the count
        plain, plain_losses, _ = train(initial, data, tmp_path, 2, 4, exact=False, optimizer=lambda m: sgd(m, 0.1))
        assert relative_error(plain, own, initial) > 1.0
        assert plain_losses[0] > 3 * own_losses[0]  # the sum of 4 micro-batch means


def test_normalize_samples_is_the_mean_of_sequence_means(tmp_path):
    initial = causal_lm("llama")
    data = lm_examples()

    def sequence_mean(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        counts = (labels != -100).sum(1)
        return (per_token.sum(1)[counts > 0] / counts[counts > 0]).mean()

    big, _, _ = train(initial, data, tmp_path, 8, 1, normalize="samples")
    exact, _, _ = train(initial, data, tmp_path, 2, 4, normalize="samples")
    own, _ = own_loss_reference(initial, data, 8, loss_of=sequence_mean)
    tokens, _ = own_loss_reference(initial, data, 8)
    assert relative_error(exact, big, initial) <= 1e-9
    assert relative_error(big, own, initial) <= 1e-9
    assert relative_error(big, tokens, initial) > 1e-2


def test_label_smoothing_is_exact(tmp_path):
    from transformers.trainer_pt_utils import LabelSmoother

    initial = causal_lm("llama")
    data = lm_examples()
    smoother = LabelSmoother(epsilon=0.1)
    big, _, _ = train(initial, data, tmp_path, 8, 1, label_smoothing_factor=0.1)
    exact, _, trainer = train(initial, data, tmp_path, 2, 4, label_smoothing_factor=0.1)
    assert trainer._gradaccum.head_path == "full logits: label smoothing needs the whole softmax"
    own, _ = own_loss_reference(initial, data, 8, loss_of=lambda model, batch: smoother(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"],
        shift_labels=True))
    assert relative_error(exact, big, initial) <= 1e-9
    assert relative_error(big, own, initial) <= 1e-6


def test_window_without_targets_is_skipped(tmp_path):
    """The second window has no target: no NaN, no AdamW step (its moments and weight decay would
    still move the weights on a zero gradient), no scheduler step; the logged losses skip it."""
    initial = causal_lm("llama")
    data = lm_examples(n=20, empty=range(8, 16))

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    big, big_losses, _ = train(initial, data, tmp_path, 8, 1, optimizer=adamw, lr_scheduler_type="linear")
    with pytest.warns(UserWarning, match="no targets"):
        exact, exact_losses, trainer = train(initial, data, tmp_path, 2, 4, optimizer=adamw,
                                             lr_scheduler_type="linear")
    own, own_losses = own_loss_reference(initial, data, 8, optimizer=adamw, linear_decay=True)
    assert relative_error(exact, big, initial) <= 1e-9
    assert relative_error(big, own, initial) <= 1e-5
    assert close_losses(exact_losses, own_losses) and len(exact_losses) == 2
    assert trainer.state.global_step == 3
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {2}
    # The control: Trainer logs 0 for the window and lets AdamW step on its zero gradient.
    plain, plain_losses, _ = train(initial, data, tmp_path, 2, 4, exact=False, optimizer=adamw,
                                   lr_scheduler_type="linear")
    assert plain_losses[1] == 0.0 and len(plain_losses) == 3
    assert relative_error(plain, own, initial) > 1e-2


def test_eval_save_and_resume(tmp_path):
    """Evaluation keeps the trainer's own loss; save_model, checkpoints and resume still work."""
    initial = causal_lm("llama")
    data, held_out = lm_examples(), lm_examples(n=6, seed=5)

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2)

    common = dict(optimizer=adamw, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "run"))
    exact, _, trainer = train(initial, data, tmp_path, 2, 4, **common)
    big, _, _ = train(initial, data, tmp_path, 8, 1, optimizer=adamw)
    assert relative_error(exact, big, initial) <= 1e-9

    trainer.eval_dataset = held_out
    plain = Trainer(model=exact, args=training_args(tmp_path, 2, 1), data_collator=collate, eval_dataset=held_out)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-12)

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = type(exact).from_pretrained(str(tmp_path / "saved"), dtype=torch.float64)
    assert relative_error(reloaded, exact, initial) == 0.0

    model = copy.deepcopy(initial)
    resumed = make_exact(Trainer(model=model, args=training_args(tmp_path, 2, 4, **{
        k: v for k, v in common.items() if k != "optimizer"}), train_dataset=data, data_collator=collate,
        optimizers=(adamw(model), None)))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert relative_error(model, exact, initial) <= 1e-12


class RegularizedTrainer(Trainer):
    """A custom compute_loss: cross-entropy plus an L2 penalty that no sum over targets holds."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss + 0.1 * sum(p.pow(2).sum() for p in model.parameters())


def test_refusals(tmp_path):
    initial = causal_lm("llama")
    data = lm_examples(n=8)
    args = training_args(tmp_path, 2, 4)
    with pytest.raises(ValueError, match="compute_loss_func"):
        make_exact(Trainer(model=initial, args=args, train_dataset=data, data_collator=collate,
                           compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss))
    with pytest.raises(ValueError, match="normalize"):
        make_exact(Trainer(model=initial, args=args, train_dataset=data, data_collator=collate), normalize="mean")
    with pytest.raises(ValueError, match="Trainer"):
        make_exact(object())
    with pytest.raises(ValueError, match="not a mean of per-target losses"):
        train(initial, data, tmp_path, 2, 4, trainer_class=RegularizedTrainer)


# ---------------------------------------------------------------------------------------------
# TRL SFTTrainer


def sft_data(kind: str):
    g = torch.Generator().manual_seed(3)

    def word(low, high):
        return "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(torch.randint(low, high, (1,),
                                                                                          generator=g)),), generator=g))

    if kind == "text":
        return [{"text": word(3, 40)} for _ in range(24)]
    if kind == "chat":  # two assistant turns; the second may be empty (its <|eos|> is still a target)
        return [{"messages": [{"role": "user", "content": word(2, 10)}, {"role": "assistant", "content": word(0, 15)},
                              {"role": "user", "content": word(2, 4)}, {"role": "assistant", "content": word(0, 5)}]}
                for _ in range(EXAMPLES)]
    return [{"prompt": word(2, 10), "completion": word(0, 19)} for _ in range(EXAMPLES)]


SFT_MODES = {
    "completion_only": ("prompt_completion", {}),
    "packing": ("text", {"packing": True, "max_length": 48}),
    "padding_free": ("prompt_completion", {"padding_free": True, "max_length": None}),
    "assistant_only": ("chat", {"assistant_only_loss": True}),
}


def sft_train(initial, tokenizer, kind, tmp_path, micro_batch_size, accumulation_steps, exact=True,
              normalize="auto", plain_count=True, **overrides):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = copy.deepcopy(initial)
    fields = dict(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=micro_batch_size,
                  gradient_accumulation_steps=accumulation_steps, num_train_epochs=1, lr_scheduler_type="constant",
                  use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                  logging_steps=1, train_sampling_strategy="sequential", max_grad_norm=0.0, bf16=False,
                  gradient_checkpointing=False, max_length=128, log_level="error", dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=SFTConfig(**{**fields, **overrides}),
                         train_dataset=Dataset.from_list(sft_data(kind)), processing_class=tokenizer,
                         optimizers=(sgd(model), None))
    if exact:
        make_exact(trainer, normalize=normalize)
    elif not plain_count:  # as for a model whose forward takes no **kwargs: Trainer counts nothing
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return model, logged_losses(trainer), trainer


@pytest.fixture(scope="module")
def sft_model():
    pytest.importorskip("trl")
    from transformers import LlamaForCausalLM

    from gradaccum.models import build_tokenizer

    tokenizer = build_tokenizer()  # byte-level; its chat template marks assistant turns with {% generation %}
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return model.to(torch.float64), tokenizer


@pytest.mark.parametrize("mode", list(SFT_MODES))
def test_sft_trainer_exact(tmp_path, sft_model, mode):
    initial, tokenizer = sft_model
    kind, overrides = SFT_MODES[mode]
    big, big_losses, _ = sft_train(initial, tokenizer, kind, tmp_path, 8, 1, **overrides)
    exact, exact_losses, trainer = sft_train(initial, tokenizer, kind, tmp_path, 2, 4, **overrides)
    assert trainer._gradaccum.objective.shift and trainer._gradaccum.head_path == "chunked"
    assert relative_error(exact, big, initial) <= 1e-9
    assert close_losses(exact_losses, big_losses)
    if mode == "completion_only":
        # TRL 1.16 is itself aligned (to float32) when Trainer counts; without the count it departs.
        plain, _, _ = sft_train(initial, tokenizer, kind, tmp_path, 2, 4, exact=False, **overrides)
        assert relative_error(plain, big, initial) <= 1e-5
        naive, _, _ = sft_train(initial, tokenizer, kind, tmp_path, 2, 4, exact=False, plain_count=False)
        assert relative_error(naive, big, initial) > 1e-3


def test_sft_padding_free_samples_equal_padded(tmp_path, sft_model):
    """normalize="samples" on padding-free rows finds each sequence from the position_ids restarts."""
    initial, tokenizer = sft_model
    padded, _, _ = sft_train(initial, tokenizer, "prompt_completion", tmp_path, 8, 1, normalize="samples")
    packed, _, _ = sft_train(initial, tokenizer, "prompt_completion", tmp_path, 2, 4, normalize="samples",
                             padding_free=True, max_length=None)
    tokens, _, _ = sft_train(initial, tokenizer, "prompt_completion", tmp_path, 8, 1)
    assert relative_error(packed, padded, initial) <= 1e-9
    assert relative_error(tokens, padded, initial) > 1e-3


def test_sft_refuses_dft_loss(tmp_path, sft_model):
    initial, tokenizer = sft_model
    with pytest.raises(ValueError, match="loss_type"):
        sft_train(initial, tokenizer, "prompt_completion", tmp_path, 2, 4, loss_type="dft")
