"""`--config FILE`: settings from YAML or JSON; the defaults < the file < the flags; one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from gradaccum import run_folder
from gradaccum.cli import main, parse
from gradaccum.config import AuditConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _data(tmp_path: Path) -> Path:
    return _write(tmp_path / "data.jsonl", "".join(json.dumps({"prompt": f"copy: w{i} =", "completion": f" w{i}"})
                                                   + "\n" for i in range(8)))


def test_the_file_overrides_the_defaults_and_the_flags_override_the_file(tmp_path):
    path = _write(tmp_path / "run.yaml", "max_length: 64\nlr: 3e-3\nlora: true\nbatch-size: 8\nseed: 5\n")
    config = TrainConfig.from_args(parse(["train", "--config", str(path), "--max-length", "32", "--no-lora"]))
    assert (config.max_length, config.lora) == (32, False)  # flags win
    assert (config.lr, config.batch_size, config.seed) == (3e-3, 8, 5)  # the file (`3e-3` is a string in YAML 1.1)
    assert config.dtype == "float32" and config.micro_batch_size == 8  # neither: the defaults
    # A bad value in the file is no error when a flag replaces it.
    bad = _write(tmp_path / "bad.yaml", "max_length: 0\n")
    assert TrainConfig.from_args(parse(["train", "--config", str(bad), "--max-length", "16"])).max_length == 16


def test_json_file_and_required_fields_from_the_file(tmp_path, capsys):
    path = _write(tmp_path / "audit.json", json.dumps({"batch_size": 8, "micro-batch-sizes": [1, 4], "steps": 2}))
    config = AuditConfig.from_args(parse(["audit", "--config", str(path)]))
    assert (config.batch_size, config.micro_batch_sizes, config.steps) == (8, [1, 4], 2)
    # Required and in neither: argparse's own message, exit 2.
    with pytest.raises(SystemExit) as exc:
        parse(["audit", "--config", str(_write(tmp_path / "a.yaml", "steps: 2\n"))])
    assert exc.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_run_config_json_round_trip(tmp_path):
    """A run_config.json as a run writes it is accepted as-is and gives back the same TrainConfig, except
    --resume and --overwrite, which act on the folder at the time: it records them as false."""
    config = TrainConfig(data="d.jsonl", max_length=64, lr=1e-5, max_grad_norm=0, lora=True, micro_batch_size=2,
                         batch_size=8, epochs=1.5, dtype="bfloat16", report_to="tensorboard,wandb",
                         output=str(tmp_path / "run"), resume=True, overwrite=True)
    run_folder.claim(tmp_path / "run", config)
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert (recorded["resume"], recorded["overwrite"]) == (False, False)
    again = TrainConfig.from_args(parse(["train", "--config", str(tmp_path / "run" / "run_config.json")]))
    assert again == dataclasses.replace(config, resume=False, overwrite=False)


@pytest.mark.parametrize("name", ["resume", "overwrite"])
def test_a_settings_file_cannot_turn_on_resume_or_overwrite(tmp_path, capsys, name):
    """They act on --output as it is now; from a file they would act again on every run made from it."""
    for suffix, text in ((".yaml", f"seed: 1\n{name}: true\n"), (".json", f'{{"seed": 1,\n "{name}": true}}')):
        path = _write(tmp_path / f"run{suffix}", text)
        assert main(["train", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"gradaccum train: error: {path}:2: {name}: "), err
        assert f"pass --{name} on the command line" in err, err
        assert not (tmp_path / "out").exists()
    # false, as run_config.json records them, is accepted; the flag still turns it on
    path = _write(tmp_path / "off.yaml", f"{name}: false\n")
    assert getattr(TrainConfig.from_args(parse(["train", "--config", str(path), f"--{name}"])), name) is True


def test_a_run_config_json_reproduces_its_run(tmp_path, capsys):
    data = _data(tmp_path)
    common = ["--no-progress", "--no-save-final", "--eval-every", "0"]
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "a"), "--max-steps", "3", "--batch-size",
                 "4", "--micro-batch-size", "2", "--max-length", "32", "--seed", "3", *common]) == 0
    assert main(["train", "--config", str(tmp_path / "a" / "run_config.json"), "--output", str(tmp_path / "b")]) == 0
    capsys.readouterr()

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("a")) == 3 and losses("a") == losses("b")
    first = json.loads((tmp_path / "a" / "run_config.json").read_text())
    second = json.loads((tmp_path / "b" / "run_config.json").read_text())
    assert {k: v for k, v in first.items() if k != "output"} == {k: v for k, v in second.items() if k != "output"}


ERRORS = {
    "unknown key": ("run.yaml", "seed: 1\nmax_lenght: 64\n",
                    "{path}:2: unknown setting 'max_lenght' (did you mean 'max_length'?)"),
    "unknown key, nothing close": ("run.yaml", "colour: blue\n", "{path}:1: unknown setting 'colour'"),
    "wrong type": ("run.yaml", "seed: 1\nmax_length: abc\n", "{path}:2: max_length: expected an integer, got 'abc'"),
    "float for an int": ("run.yaml", "max-length: 2.5\n", "{path}:1: max-length: expected an integer, got 2.5"),
    "not a bool": ("run.yaml", "lora: maybe\n", "{path}:1: lora: expected true or false, got 'maybe'"),
    "null for a required value": ("run.yaml", "max_length: null\n",
                                  "{path}:1: max_length: expected an integer, got null"),
    "the flag's own check": ("run.yaml", "\nmax_length: 0\n", "{path}:2: --max-length must be >= 1, got 0"),
    "the flag's choices": ("run.yaml", "dtype: float16\n",
                           "{path}:1: --dtype: unknown value 'float16' (choose from float32, bfloat16, float64)"),
    "a list": ("run.yaml", "- max_length\n- 64\n", "{path}: expected a mapping of settings (name: value), got a list"),
    "empty": ("run.yaml", "# nothing\n", "{path}: expected a mapping of settings (name: value), got an empty file"),
    "yaml null": ("run.yaml", "null\n", "{path}: expected a mapping of settings (name: value), got null"),
    "json null": ("run.json", "null\n", "{path}: expected a mapping of settings (name: value), got null"),
    "a number for a string": ("run.yaml", "seed: 1\noutput: true\n",
                              "{path}:2: output: expected a string, got true (quote it"),
    "bad yaml": ("run.yaml", "seed: 1\nmax_length: [64,\n", "{path}:3: not valid YAML: "),
    "yaml tab": ("run.yaml", "seed: 1\n\tlr: 2\n", "{path}:2: not valid YAML: "),
    "twice": ("run.yaml", "lr: 1e-3\nseed: 2\nlr: 2e-3\n", "{path}:3: 'lr' is set twice (also on line 1)"),
    "twice, two spellings": ("run.yml", "max_length: 8\nmax-length: 9\n",
                             "{path}:2: 'max-length' is set twice (also on line 1)"),
    "bad json": ("run.json", '{"seed": 1,\n "lr": }\n', "{path}:2: not valid JSON: Expecting value"),
    "json unknown key": ("run.json", '{\n  "seed": 1,\n  "sed": 2\n}\n',
                         "{path}:3: unknown setting 'sed' (did you mean 'seed'?)"),
    "json wrong type": ("run.json", '{"lora": "yes"}', "{path}:1: lora: expected true or false, got 'yes'"),
    "suffix": ("run.toml", "seed = 1\n", "--config {path}: expected a .yaml, .yml or .json file"),
    "a python object": ("run.yaml", "seed: !!python/object:os.system [ls]\n", "{path}:1: not valid YAML: "),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_naming_file_line_and_key(tmp_path, capsys, case):
    name, text, expected = ERRORS[case]
    path = _write(tmp_path / name, text)
    code = main(["train", "--config", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("gradaccum train: error: " + expected.format(path=path)), err
    assert not (tmp_path / "out").exists()


def test_a_later_check_also_names_the_line_of_the_value(tmp_path, capsys):
    """Checks made in set-up (the batch geometry) name the flag; a value from the file gets its line."""
    path = _write(tmp_path / "run.yaml", f"data: {_data(tmp_path)}\nbatch_size: 8\nmicro_batch_size: 3\n")
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"gradaccum train: error: {path}:2: --batch-size 8 is not a multiple "
                                               "of micro-batch size 3 x world size 1 = 3")
    assert not (tmp_path / "out").exists()


def test_missing_file_and_a_setting_of_another_command(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"gradaccum train: error: --config {tmp_path / 'nope.yaml'}: no such file"
    path = _write(tmp_path / "audit.yaml", "batch_size: 8\neval_data: held.jsonl\n")
    assert main(["audit", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"gradaccum audit: error: {path}:2: 'eval_data' is a setting of "
                                               "`gradaccum train`, not of `gradaccum audit`")


def test_the_readme_example_is_examples_run_yaml_and_it_trains(tmp_path, monkeypatch, capsys):
    example = ROOT / "examples" / "run.yaml"
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert example.read_text() in blocks  # the README shows the file as it is
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository, as the README runs it
    config = TrainConfig.from_args(parse(["train", "--config", "examples/run.yaml"]))
    assert config.data == "examples/data/chat.jsonl" and config.batch_size == 8
    code = main(["train", "--config", "examples/run.yaml", "--max-steps", "1", "--output", str(tmp_path / "out"),
                 "--report-to", "none", "--no-progress", "--no-save-final"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("text, expected", [
    ("12:30", "12:30"),  # YAML 1.1 reads a base-60 number: 750
    ("0755", "0755"),  # an octal number: 493
    ("1_2", "1_2"),  # 12
    ("2024", "2024"),
    ("1.50", "1.50"),
    ("'0755'", "0755"),
])
def test_a_string_setting_keeps_the_text_as_written(tmp_path, text, expected):
    path = _write(tmp_path / "run.yaml", f"output: {text}\ndata: {text}\nmemory_budget: 4000000000\n"
                                         "micro_batch_size: auto\nbatch_size: 8\n")
    config = TrainConfig.from_args(parse(["train", "--config", str(path)]))
    assert (config.output, config.data, config.memory_budget) == (expected, expected, "4000000000")


# Each pair of settings of which a run takes one: a flag replaces the file's value of the other.
ALTERNATIVES = [
    ("max_steps: 20\n", ["--epochs", "2"], dict(max_steps=None, epochs=2.0)),
    ("epochs: 2\n", ["--max-steps", "5"], dict(max_steps=5, epochs=None)),
    ("batch_size: 8\n", ["--accumulation-steps", "2"], dict(batch_size=None, accumulation_steps=2)),
    ("accumulation_steps: 2\n", ["--batch-size", "8"], dict(batch_size=8, accumulation_steps=None)),
    ("micro_batch_size: auto\nbatch_size: 8\nmemory_budget: 4GB\n", ["--micro-batch-size", "2"],
     dict(micro_batch_size=2, memory_budget=None, batch_size=8)),
    # 'auto' goes with a budget: the file's stays
    ("micro_batch_size: 4\nbatch_size: 8\nmemory_budget: 4GB\n", ["--micro-batch-size", "auto"],
     dict(micro_batch_size="auto", memory_budget="4GB")),
]


@pytest.mark.parametrize("text, flags, expected", ALTERNATIVES)
def test_a_flag_replaces_the_files_value_of_its_alternative(tmp_path, text, flags, expected):
    path = _write(tmp_path / "run.yaml", text)
    config = TrainConfig.from_args(parse(["train", "--config", str(path), *flags]))
    assert {name: getattr(config, name) for name in expected} == expected


def test_both_alternatives_on_the_command_line_or_in_the_file_are_still_refused(tmp_path, capsys):
    path = _write(tmp_path / "run.yaml", "seed: 1\nmax_steps: 20\nepochs: 2\n")
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "give --max-steps or --epochs, not both" in capsys.readouterr().err
    assert main(["train", "--max-steps", "2", "--epochs", "1", "--output", str(tmp_path / "out")]) == 2
    assert "not both" in capsys.readouterr().err


def test_the_example_file_takes_epochs_instead_of_its_max_steps(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = TrainConfig.from_args(parse(["train", "--config", "examples/run.yaml", "--epochs", "2"]))
    assert (config.max_steps, config.epochs) == (None, 2.0)


def test_yaml_merge_keys_give_way_to_the_keys_beside_them(tmp_path):
    """YAML's merge: the keys written beside `<<` win, and of the merged mappings the first wins."""
    path = _write(tmp_path / "run.yaml", "<<: [{seed: 3, lr: 0.1, dtype: float64}, {seed: 5, lr: 0.2, "
                                         "max_length: 8}]\nseed: 4\n")
    config = TrainConfig.from_args(parse(["train", "--config", str(path)]))
    assert (config.seed, config.lr, config.max_length, config.dtype) == (4, 0.1, 8, "float64")
