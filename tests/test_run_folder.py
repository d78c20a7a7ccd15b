"""The --output folder: replaying a run's run_config.json, --resume with other settings, a damaged
run_config.json. Whatever is refused leaves every folder as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gradaccum import run_folder
from gradaccum.cli import main
from gradaccum.config import TrainConfig
from gradaccum.errors import ConfigError
from test_train import write_pairs


def _cli(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    """One step of the tiny preset, B = 4, no final/ (a second or two)."""
    code = main(["train", "--data", str(tmp_path / "data.jsonl"), "--no-progress", "--max-steps", "1",
                 "--eval-every", "0", "--save-every", "0", "--batch-size", "4", "--micro-batch-size", "4",
                 "--max-length", "32", "--no-save-final", *args])
    return code, capsys.readouterr().err.strip()


def _replay(capsys, run: Path, *args: str) -> tuple[int, str]:
    code = main(["train", "--config", str(run / "run_config.json"), *args])
    return code, capsys.readouterr().err.strip()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_replaying_the_run_config_of_an_overwrite_run_deletes_no_run(tmp_path, capsys):
    """A run made with --overwrite: its run_config.json replayed with another setting, or into another
    run's folder, is refused (the file does not carry --overwrite along); into a new folder, it trains."""
    write_pairs(tmp_path / "data.jsonl")
    first, other = tmp_path / "first", tmp_path / "other"
    assert _cli(tmp_path, capsys, "--output", str(first), "--overwrite")[0] == 0
    assert _cli(tmp_path, capsys, "--output", str(other), "--seed", "1")[0] == 0
    before = _tree(first), _tree(other)
    code, err = _replay(capsys, first, "--max-steps", "2")
    assert code == 2 and "holds a different run (max_steps: 1 there, 2 now)" in err, err
    code, err = _replay(capsys, first)
    assert code == 2 and "already holds a run" in err, err
    code, err = _replay(capsys, first, "--output", str(other))
    assert code == 2 and "holds a different run (seed: 1 there, 0 now)" in err, err
    assert (_tree(first), _tree(other)) == before
    assert _replay(capsys, first, "--output", str(tmp_path / "again"))[0] == 0


def test_replaying_the_run_config_of_a_resumed_run_into_a_new_folder(tmp_path, capsys):
    write_pairs(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    assert _cli(tmp_path, capsys, "--output", str(run), "--save-every", "1", "--max-steps", "2")[0] == 0
    code, err = _cli(tmp_path, capsys, "--output", str(run), "--save-every", "1", "--max-steps", "2", "--resume")
    assert code == 0, err
    assert json.loads((run / "run_config.json").read_text())["resume"] is False
    code, err = _replay(capsys, run, "--output", str(tmp_path / "again"))
    assert code == 0, err
    assert len((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_resume_refuses_other_settings_whatever_overwrite_says(tmp_path, capsys, overwrite):
    """--resume --overwrite deletes nothing, so it would go on training with the new settings and claim
    them in run_config.json: refused, as without --overwrite, and the message does not offer --overwrite
    as a way to continue."""
    write_pairs(tmp_path / "data.jsonl")
    write_pairs(tmp_path / "other.jsonl", seed=1)
    run = tmp_path / "run"
    assert _cli(tmp_path, capsys, "--output", str(run), "--save-every", "1", "--max-steps", "2")[0] == 0
    before = _tree(run)
    for flags, change in ((["--lr", "0.5"], "lr: None there, 0.5 now"), (["--seed", "3"], "seed: 0 there, 3 now"),
                          (["--dtype", "float64"], "dtype: 'float32' there, 'float64' now"),
                          (["--data", str(tmp_path / "other.jsonl")], "data: ")):
        code, err = _cli(tmp_path, capsys, "--output", str(run), "--save-every", "1", "--max-steps", "2", "--resume",
                         *overwrite, *flags)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"holds a different run ({change}" in err, err
        assert err.endswith("drop --resume to start over (with --overwrite)"), err
        assert "or --overwrite" not in err, err
        assert _tree(run) == before


@pytest.mark.parametrize("text, why", [("", "is empty"), ('{"model": "tiny",', "not valid JSON"),
                                       ("[1, 2]", "not a JSON object")])
def test_a_damaged_run_config_json_is_named_as_such(tmp_path, text, why):
    output = tmp_path / "run"
    run_folder.claim(output, TrainConfig(output=str(output)))
    (output / "run_config.json").write_text(text)
    for flags in (dict(), dict(resume=True), dict(resume=True, overwrite=True)):
        with pytest.raises(ConfigError) as error:
            run_folder.check(output, TrainConfig(output=str(output), **flags), has_checkpoint=True)
        message = str(error.value)
        assert f"{output / 'run_config.json'}: {why}" in message and "different run" not in message, message
        if flags.get("resume"):
            assert "or --overwrite" not in message, message
    # --overwrite replaces the run that file belonged to (the folder holds a run's marker)
    run_folder.check(output, TrainConfig(output=str(output), overwrite=True), has_checkpoint=True)


def test_run_config_json_is_replaced_in_one_step(tmp_path, monkeypatch):
    """A kill while run_config.json is written leaves the old file or the new one, never a part."""
    output = tmp_path / "run"
    run_folder.claim(output, TrainConfig(output=str(output)))
    before = (output / "run_config.json").read_text()

    def killed(*args, **kwargs):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        run_folder.claim(output, TrainConfig(output=str(output), resume=True, eval_every=3))
    assert (output / "run_config.json").read_text() == before
