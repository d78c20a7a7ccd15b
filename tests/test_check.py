"""`gradaccum check`: the probe's verdicts on reference classes, checked against what Trainer really does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradaccum import check, cli
from gradaccum.check import probes, structure

ROOT = Path(__file__).resolve().parents[1]


def _table_script():
    spec = importlib.util.spec_from_file_location("check_all_models", ROOT / "scripts" / "check_all_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE = _table_script()


def tiny(class_name: str, task: str = "causal-lm"):
    return TABLE.tiny_model(class_name, task)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`gradaccum check ARGV` through the CLI's own parser and error handling."""
    code = cli.main(["check", *argv])
    return code, capsys.readouterr().out


# The classes the issue names, with what transformers 5.x Trainer does with each.
REFERENCE = {
    "LlamaForCausalLM": ("causal-lm", "exact"),
    "BartForCausalLM": ("causal-lm", "count-dropped"),
    "XLNetLMHeadModel": ("causal-lm", "count-dropped"),
    "LlamaForSequenceClassification": ("sequence-classification", "count-dropped"),
    "GPT2LMHeadModel": ("causal-lm", "count-mismatch"),
    "T5ForConditionalGeneration": ("seq2seq-lm", "count-dropped"),
}


@pytest.mark.parametrize("class_name", list(REFERENCE))
def test_reference_classes(class_name):
    task, verdict = REFERENCE[class_name]
    result = check.check_model(tiny(class_name, task), task=task)
    assert result.trainer.verdict == verdict, check.format_report(result)
    assert result.exact_under_trainer == (verdict == "exact")
    assert result.ours == "exact" and not result.departures
    assert ("make_exact" in result.fix) == (verdict != "exact")
    if verdict == "count-dropped":
        assert result.count_honoured == "no" and result.trainer.passes_count
        assert not result.trainer.divides_by_accumulation_steps
    if class_name == "GPT2LMHeadModel":  # honours the count, but Trainer counts position 0 too
        assert result.count_honoured == "yes" and result.trainer.counts == "unshifted"
        assert result.loss_targets == "shifted" and result.trainer.count_ratio < 1
        assert result.trainer.weights == pytest.approx([result.trainer.count_ratio] * 2, rel=1e-4)


def _trainer_gradient(model, batches):
    """The gradient transformers.Trainer accumulates over the window, through its own training_step."""
    trainer = probes.build_trainer(model, batches)
    count = probes.trainer_count(trainer, batches)
    trainer.current_gradient_accumulation_steps = len(batches)
    model.zero_grad()
    for batch in batches:
        trainer.training_step(model, dict(batch), count)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _weighted_gradient(model, batches, targets, weights):
    """sum_k weight_k * grad(S_k / N): the big batch's gradient when every weight is 1."""
    model.zero_grad()
    outputs = [model(**{k: v for k, v in batch.items() if k != "labels"}) for batch in batches]
    sums = [probes.summed_loss(probes.logits_of(out), batch["labels"], targets, model.config)
            for out, batch in zip(outputs, batches)]
    total = sum(n for _, n in sums)
    sum(w * s / total for w, (s, _) in zip(weights, sums)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("class_name", ["LlamaForCausalLM", "GPT2LMHeadModel", "BartForCausalLM",
                                        "LlamaForSequenceClassification"])
def test_weights_are_what_trainer_really_does(class_name):
    """The probe's per-micro-batch weights, applied to the big-batch loss, give the gradient that
    Trainer's training_step really accumulates; weights of 1 (the big batch) do only for Llama."""
    task = REFERENCE[class_name][0]
    model = tiny(class_name, task).double()
    result = check.check_model(model, task=task)
    restore = structure.Restore()
    structure.switch_off_dropout(model, restore)
    batches = probes.probe_batches(model, task)
    with probes.quiet():
        trainer = _trainer_gradient(model, batches)
    predicted = _weighted_gradient(model, batches, result.loss_targets, result.trainer.weights)
    big_batch = _weighted_gradient(model, batches, result.loss_targets, [1.0] * len(batches))
    assert float((trainer - predicted).norm() / trainer.norm()) < 1e-5
    error = float((trainer - big_batch).norm() / big_batch.norm())
    assert error < 1e-5 if result.exact_under_trainer else error > 1e-2, error


def test_tiny_preset_exits_0(capsys):
    code, out = run_cli(["--model", "tiny"], capsys)
    assert code == 0, out
    assert "verdict: exact under HF Trainer as-is" in out and "LlamaForCausalLM" in out
    code, out = run_cli(["--model", "tiny", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["exact_under_trainer"] and data["trainer"]["verdict"] == "exact"
    assert data["trainer"]["weights"] == pytest.approx([1.0, 1.0], rel=1e-4)


def test_model_that_drops_the_count_exits_1(tmp_path, capsys):
    from gradaccum.models import build_tokenizer

    model = tiny("BartForCausalLM")
    model.save_pretrained(tmp_path / "bart")
    build_tokenizer().save_pretrained(tmp_path / "bart")
    code, out = run_cli(["--model", str(tmp_path / "bart")], capsys)
    assert code == 1, out
    assert "drops it" in out and "gradaccum.hf.make_exact(trainer)" in out
    assert "packing: leaks" in out  # Bart's decoder ignores position_ids


@pytest.mark.parametrize("model, fragment", [("./no/such/model", "does not exist"),
                                             ("{file}", "is a file")])
def test_a_bad_model_is_one_line_and_exit_2(tmp_path, capsys, model, fragment):
    (tmp_path / "notes.txt").write_text("not a model")
    code = cli.main(["check", "--model", model.format(file=tmp_path / "notes.txt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("gradaccum check: error: --model"), err
    assert fragment in err


def test_the_probe_names_load_lazily():
    """`gradaccum check --help` builds the parser from gradaccum.check without torch; the probe's
    names still import from the package."""
    code = ("import sys\nimport gradaccum.check as c\nassert 'torch' not in sys.modules\n"
            "from gradaccum.check import CheckResult, TrainerFacts, check_model, format_report\n"
            "assert check_model.__module__ == 'gradaccum.check.run'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-500:]


class TokenBatchNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def test_batchnorm_is_a_departure_and_the_model_is_left_as_it_was():
    plain = check.check_model(tiny("LlamaForCausalLM"))
    model = tiny("LlamaForCausalLM")
    mlp = model.model.layers[0].mlp
    mlp.act_fn = nn.Sequential(nn.SiLU(), TokenBatchNorm(model.config.intermediate_size), nn.Dropout(0.1))
    model.eval()
    result = check.check_model(model)
    assert not plain.departures and plain.exact_under_trainer
    assert result.departures and result.departures[0].startswith("BatchNorm"), result.departures
    assert result.trainer.verdict == "exact" and not result.exact_under_trainer and result.ours == "not exact"
    assert "BatchNorm" in result.fix
    norm = mlp.act_fn[1].norm
    assert not model.training and mlp.act_fn[2].p == 0.1 and model.config.use_cache
    assert int(norm.num_batches_tracked) == 0 and float(norm.running_mean.abs().max()) == 0.0


@pytest.mark.parametrize("aux", [False, True])
def test_router_aux_loss(aux):
    model = tiny("MixtralForCausalLM")
    model.config.output_router_logits = aux
    result = check.check_model(model)
    if aux:
        assert result.trainer.verdict == "unknown-loss" and result.loss_targets == "other"
        assert any(d.startswith("router aux loss") for d in result.departures)
        assert not result.exact_under_trainer and result.ours == "exact"
    else:
        assert result.exact_under_trainer and any("aux loss off" in note for note in result.notes)


@pytest.mark.slow  # three worker start-ups of transformers: ~50 s on a shared CPU
def test_table_script_on_a_handful(tmp_path):
    classes = "LlamaForCausalLM,GPT2LMHeadModel,LlamaForSequenceClassification"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "check_all_models.py"), "--classes", classes,
                    "--output", str(tmp_path / "table.md"), "--json", str(tmp_path / "rows.json"),
                    "--log", str(tmp_path / "log"), "--timeout", "60"], check=True, capture_output=True, timeout=300)
    rows = {row["class"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["LlamaForCausalLM"]["result"]["exact_under_trainer"]
    assert rows["GPT2LMHeadModel"]["result"]["trainer"]["verdict"] == "count-mismatch"
    assert rows["LlamaForSequenceClassification"]["result"]["trainer"]["verdict"] == "count-dropped"
    table = (tmp_path / "table.md").read_text()
    assert "| checked | 2 | 0 | 1 | 3 |" in table and "| LlamaForCausalLM | causal-lm | exact |" in table
    assert "| LlamaForSequenceClassification | sequence-classification | **not exact** |" in table
