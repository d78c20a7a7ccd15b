"""`gradaccum audit`: report and figure, the gate both ways, and the transformers.Trainer check.

A 2-layer, hidden-32 Llama with the tiny preset's byte tokenizer, saved as a local model folder,
trains on prompt/completion pairs whose completions hold 2 to 41 target tokens: variable length,
the case where naive accumulation departs from the full batch. A second tiny Llama, trained near a
minimum of its window, has float32 rounding of ~1e-4: the gate must call that rounding (issue 14),
and must still fail a bug that mis-weights one micro-batch of 8 by 2%, in float32 and float64.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import gradaccum.audit as audit
from gradaccum.accumulate import Accumulator, Window
from gradaccum.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from gradaccum.models import build_tokenizer, tiny_config

    root = tmp_path_factory.mktemp("audit")
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(32):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 40)))
            f.write(json.dumps({"prompt": f"copy {'x' * rng.randint(0, 20)} {word} =", "completion": f" {word}"})
                    + "\n")
    with open(root / "equal.jsonl", "w") as f:  # every completion the same length: naive == exact
        for _ in range(16):
            word = "".join(rng.choice("abcdefgh") for _ in range(6))
            f.write(json.dumps({"prompt": f"copy {'x' * rng.randint(0, 20)} {word} =", "completion": f" {word}"})
                    + "\n")
    return root


@pytest.fixture(scope="module")
def converged(tmp_path_factory):
    """A tiny Llama trained near a minimum of its one window's loss, where float32 rounding is large.

    Pairs of examples share a prompt and disagree on the completion ('aaa...' against 'bbb...', 2 to
    95 target tokens): near the minimum their per-token gradients cancel, so the window's gradient is
    small against the terms it sums and its float32 rounding is large relative to it (here ~1e-4).
    That is the SmolLM2 LoRA audit the constant 1e-5 gate failed (9.1e-5 at cosine 0.999999996):
    rounding, not a departure. A random-init model is far from that; its float32 rounding is ~1e-7.
    """
    from transformers import LlamaForCausalLM

    from gradaccum.data import collate, tokenize
    from gradaccum.losses import CausalLMLoss
    from gradaccum.models import build_tokenizer, tiny_config

    root = tmp_path_factory.mktemp("converged")
    tokenizer = build_tokenizer()
    records = [{"prompt": f"q{i // 2}:", "completion": "ab"[i % 2] * (length + 1)}
               for i, length in enumerate([1, 94, 50, 20, 70, 5, 35, 88])]
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    config = tiny_config(len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Raw pairs: the audit below reads them the same way (chat_template=False), so the model is converged
    # on exactly the tokens it audits.
    examples, _ = tokenize(list(enumerate(records, 1)), tokenizer, 256, path="pairs", chat_template=False)
    batch = collate(examples, tokenizer.pad_token_id)
    num_targets = int((batch["labels"][:, 1:] != -100).sum())
    loss = CausalLMLoss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(100):  # full batch: the audit's batch of 8 is this whole window
        optimizer.zero_grad()
        (loss(batch["input_ids"], batch["attention_mask"], batch["labels"]) / num_targets).backward()
        optimizer.step()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def argv(setup, out, *extra):
    return ["audit", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--batch-size", "8",
            "--micro-batch-sizes", "1,4", "--steps", "3", "--lr", "1e-2", "--output", str(out), "--no-progress",
            *extra]


def test_report_figure_and_gate_pass(setup, tmp_path):
    out = tmp_path / "audit"
    assert main(argv(setup, out)) == 0
    report = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    png = (out / "audit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 40_000  # two panels of curves, not an empty canvas

    # The gate: exact equals the full batch to float64 rounding, at every micro-batch size. The bound
    # is this run's: a float32 copy's full-batch gradient against the float64 one, scaled by 2^-29.
    gate = report["gate"]
    assert report["passed"] and report["exit_code"] == 0
    assert gate["dtype"] == "float64" and 1e-8 < gate["float32_error"] < 1e-5
    assert gate["rounding"] == pytest.approx(gate["float32_error"] * 2.0 ** -29)
    assert report["tolerance"] == gate["tolerance"] == pytest.approx(10 * gate["rounding"] + 10 * 2.0 ** -52)
    assert report["tolerance"] < 1e-13
    by_size = {mb["micro_batch_size"]: mb for mb in report["micro_batches"]}
    assert sorted(by_size) == [1, 4]
    for mb in by_size.values():
        exact, naive = mb["exact"], mb["naive"]
        assert exact["gradient_error"] <= 1e-12 and exact["gradient_cosine"] == pytest.approx(1, abs=1e-12)
        assert exact["weight_distance"] <= 1e-12 and exact["max_loss_difference"] <= 1e-12
        assert not exact["departs"]
        # ... and naive is flagged, on the same runs: far beyond rounding, everywhere.
        assert naive["departs"] and naive["gradient_error"] > 1e-2 and naive["weight_distance_vs_update"] > 1e-2
        assert naive["max_loss_difference"] > 1e-4
        assert len(exact["losses"]) == len(naive["losses"]) == 3
    assert report["naive_departs"] and report["max_naive_gradient_error"] > 1e-2
    assert report["full_losses"] == pytest.approx(by_size[1]["exact"]["losses"], abs=1e-12)
    assert report["first_window_consistency"] <= 1e-12  # the gradient check saw the runs' weights and window

    # The cause: target tokens per micro-batch, counted the way the loss counts them.
    spread = by_size[1]["targets_first_window"]
    counts = by_size[1]["targets_per_micro_batch_first_window"]
    assert len(counts) == 8 and (spread["min"], spread["max"]) == (min(counts), max(counts))
    assert spread["min"] < spread["max"] and spread["cv"] > 0.1
    assert spread["naive_weight_min"] < 1 < spread["naive_weight_max"]
    assert len(by_size[4]["targets_per_micro_batch_first_window"]) == 2

    verdict = report["verdict"]
    assert verdict.startswith("Exact accumulation matches the full batch") and "naive accumulation departs" in verdict
    assert f"{spread['min']} to {spread['max']} target tokens" in verdict
    assert "worse" not in text  # departs, never "trains worse" on the audit's word alone
    for heading in ("The gate", "First-step gradient", "Final weights", "Loss per step", "The cause", "Why"):
        assert f"## {heading}" in text, heading
    assert verdict in text and "audit.png" in text and gate["how"] in text
    # The runs keep what the report needs, not a model each: their weights were compared in memory.
    for name in ("full", "exact-m1", "naive-m1", "exact-m4", "naive-m4"):
        assert (out / "runs" / name / "metrics.jsonl").exists() and not (out / "runs" / name / "final").exists()
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 2_000_000


def test_save_models_writes_the_final_models(setup, tmp_path):
    out = tmp_path / "saved"
    assert main(argv(setup, out, "--micro-batch-sizes", "4", "--steps", "1", "--save-models")) == 0
    for name in ("full", "exact-m4", "naive-m4"):
        assert (out / "runs" / name / "final" / "model.safetensors").exists(), name
    assert "final model (--save-models)" in (out / "report.md").read_text()


def test_gate_fails_when_exact_accumulation_departs(setup, tmp_path, monkeypatch, capsys):
    """Break the Accumulator into the per-micro-batch mean: the audit must exit 1 and say so."""
    original = Accumulator.__init__

    def broken(self, *args, **kwargs):
        kwargs["accumulation"] = "naive"
        original(self, *args, **kwargs)

    monkeypatch.setattr(Accumulator, "__init__", broken)
    out = tmp_path / "broken"
    assert main(argv(setup, out, "--steps", "1")) == 1
    report = json.loads((out / "report.json").read_text())
    assert not report["passed"] and report["exit_code"] == 1
    assert report["max_exact_gradient_error"] > 1e-2
    assert report["verdict"].startswith("Exact accumulation DEPARTS")
    assert "gate failed" in (out / "report.md").read_text()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float32_rounding_is_not_a_departure(converged, tmp_path, dtype):
    """Issue 14: exact accumulation in float32, 1e-4 from the full batch, is rounding: the gate passes.

    A constant gate (1e-5) failed this correct run. The bound derived from the run passes it and
    still flags naive accumulation at every micro-batch size; in float64 the same bound is tight.
    """
    result = audit.run(model=str(converged / "model"), data=str(converged / "pairs.jsonl"), batch_size=8,
                       micro_batch_sizes=[1, 2, 4], steps=1, dtype=dtype, output=str(tmp_path / dtype),
                       progress=False, chat_template=False)
    if dtype == "float32":
        # The false alarm's setting: exact is further than 1e-5 from the float32 full batch ...
        assert result.max_exact_gradient_error > 1e-5
    # ... and the audit says it matches, because that is this run's rounding.
    assert result.passed and result.exit_code == 0, result.verdict
    assert result.verdict.startswith("Exact accumulation matches the full batch")
    gate = result.gate
    # The float32 full batch is itself this far from the float64 gradient: float32 rounding here.
    assert gate.dtype == dtype and gate.factor == 10 and gate.float32_error > 1e-5
    eps = torch.finfo(getattr(torch, dtype)).eps
    assert gate.rounding == pytest.approx(gate.float32_error * eps / torch.finfo(torch.float32).eps)
    assert gate.floor == pytest.approx(10 * eps)
    assert result.tolerance == gate.tolerance == pytest.approx(10 * gate.rounding + gate.floor)
    if dtype == "float64":
        assert result.tolerance < 1e-10  # float64 rounding is 2^-29 of float32's: the gate stays tight
    for mb in result.micro_batches:
        exact, naive = mb.exact, mb.naive
        # Exact sits as close to the float64 gradient as the float32 full batch does (or closer).
        assert exact.gradient_error_vs_float64 <= 3 * max(gate.rounding, gate.floor)
        assert not exact.departs and exact.gradient_cosine > 0.99999
        assert naive.departs and naive.gradient_error > 100 * result.tolerance
    assert result.naive_departs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bug, factor", [("one micro-batch weighted 2% off", 1.02), ("one micro-batch lost", 0.0)])
def test_small_departure_is_caught(setup, tmp_path, monkeypatch, dtype, bug, factor):
    """A bug that touches one micro-batch of 8 (a miscount, a lost backward) fails the gate, in float32 too."""
    scale = Window.scale

    def buggy(self, summed_loss, *args, **kwargs):
        scaled = scale(self, summed_loss, *args, **kwargs)
        return scaled * factor if self.acc.accumulation_steps == 8 and self.micro_step == 3 else scaled

    monkeypatch.setattr(Window, "scale", buggy)
    result = audit.run(model=str(setup / "model"), data=str(setup / "data.jsonl"), batch_size=8,
                       micro_batch_sizes=[1], steps=1, dtype=dtype, output=str(tmp_path / "bug"), progress=False)
    exact, naive = result.micro_batches[0].exact, result.micro_batches[0].naive
    assert not result.passed and result.exit_code == 1 and exact.departs, bug
    assert result.verdict.startswith("Exact accumulation DEPARTS")
    assert exact.gradient_error > 100 * result.tolerance  # far from the bound, not a coin toss
    assert naive.departs and result.naive_departs


def test_gradient_bound_in_numbers():
    """The SmolLM2 LoRA audit of issue 14, through the verdict's bound with its own numbers."""
    # float32: exact was 9.1e-5 from the full batch (cosine 0.999999996), naive 213%. A float32 full
    # batch whose own float32 rounding is 5e-5 makes the first rounding and the second a departure.
    gate = audit.gradient_bound("float32", 5e-5)
    assert gate.rounding == 5e-5 and gate.floor == pytest.approx(1.19e-6, rel=1e-2)
    assert gate.tolerance == pytest.approx(5.0119e-4, rel=1e-3)
    assert 9.1e-5 <= gate.tolerance < 2.13
    assert "5.0e-05" in gate.how and "float64" in gate.how
    # float64: the same run's float32 measurement scaled by 2^-29; exact was 6.4e-16.
    gate = audit.gradient_bound("float64", 5e-5)
    assert gate.rounding == pytest.approx(9.3e-14, rel=1e-2) and 6.4e-16 <= gate.tolerance < 1e-11
    # No rounding measured (e.g. an exactly representable gradient): only the floor, 10 eps.
    assert audit.gradient_bound("float64", 0.0).tolerance == pytest.approx(10 * 2.0 ** -52)
    assert audit.gradient_bound("float32", float("nan")).tolerance == pytest.approx(10 * 2.0 ** -23)


def test_equal_target_counts_naive_agrees(setup, tmp_path):
    """With the same number of targets in every micro-batch, naive is the big batch: not flagged."""
    result = audit.run(model=str(setup / "model"), data=str(setup / "equal.jsonl"), batch_size=8,
                       micro_batch_sizes=[2], steps=1, output=str(tmp_path / "equal"), progress=False)
    assert result.passed and not result.naive_departs
    assert result.micro_batches[0].targets_first_window.cv == 0
    assert result.max_naive_gradient_error <= 1e-12
    assert "naive accumulation agrees here too" in result.verdict


def test_hf_trainer_comparison(setup, tmp_path):
    """transformers.Trainer: aligned as the model is; the 2024 bug without num_items_in_batch."""
    result = audit.run(model=str(setup / "model"), data=str(setup / "data.jsonl"), batch_size=8,
                       micro_batch_sizes=[2], steps=2, lr=1e-2, against="hf-trainer",
                       output=str(tmp_path / "hf"), progress=False)
    hf = result.hf_trainer
    assert hf is not None and hf.accumulation_steps == 4 and hf.steps == 2 and hf.aligned and result.passed
    cases = {case.name: case for case in hf.cases}
    assert set(cases) == {"as-is", "no-loss-kwargs", "drops-num-items"}
    as_is, no_kwargs, drops = cases["as-is"], cases["no-loss-kwargs"], cases["drops-num-items"]
    assert as_is.model_accepts_loss_kwargs and not as_is.departs and as_is.gradient_error <= hf.tolerance
    assert as_is.weight_distance_vs_update <= 1e-6
    assert not no_kwargs.model_accepts_loss_kwargs and no_kwargs.departs
    # Without the count Trainer runs exactly gradaccum's naive accumulation: the same gradient error.
    assert no_kwargs.gradient_error == pytest.approx(result.micro_batches[0].naive.gradient_error, rel=1e-6)
    assert no_kwargs.weight_distance_vs_update > 1e-2
    # A forward that drops the count: micro-batch means summed, k times the naive gradient.
    assert drops.model_accepts_loss_kwargs and drops.departs and drops.gradient_error > 1
    assert drops.gradient_cosine == pytest.approx(no_kwargs.gradient_cosine, abs=1e-9)
    report = json.loads((tmp_path / "hf" / "report.json").read_text())
    assert report["hf_trainer"]["cases"][1]["name"] == "no-loss-kwargs"
    assert "## transformers.Trainer" in (tmp_path / "hf" / "report.md").read_text()
    assert "aligned with GA=1" in result.verdict


@pytest.mark.parametrize("extra, fragment", [
    (["--micro-batch-sizes", "3"], "does not divide"),
    (["--micro-batch-sizes", "8"], "below --batch-size"),
    (["--micro-batch-sizes", "1,x"], "not an integer"),
    (["--dtype", "bfloat16"], "dtype"),
    (["--against", "deepspeed"], "against"),
    (["--batch-size", "64"], "exceeds the 32 examples"),
])
def test_bad_arguments_exit_2_with_one_line(setup, tmp_path, capsys, extra, fragment):
    assert main(argv(setup, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_batch_size_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["audit", "--steps", "1"])
    assert exc.value.code == 2 and "--batch-size" in capsys.readouterr().err
