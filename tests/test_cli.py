"""Bad input: one line on stderr naming what is wrong, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from gradaccum.cli import main


def _good(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i} =", "completion": f" c{i}"}) + "\n" for i in range(8)))
    return path


CASES = {
    "malformed json": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', ["bad.jsonl:2"]),
    "missing field": ('{"prompt": "a"}\n', ["bad.jsonl:1", "completion"]),
    "wrong type": ('{"prompt": "a", "completion": 3}\n', ["bad.jsonl:1", "completion"]),
    "empty file": ("", ["bad.jsonl", "empty"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_names_file_line_and_field(tmp_path, capsys, case):
    text, expected = CASES[case]
    (tmp_path / "bad.jsonl").write_text(text)
    code = main(["train", "--data", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "out"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for fragment in expected:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("args, fragment", [
    (["--data", "does-not-exist.jsonl"], "does-not-exist.jsonl"),
    (["--model", "./no/such/model"], "no/such/model"),
    (["--micro-batch-size", "0"], "micro-batch-size"),
    (["--micro-batch-size", "3", "--batch-size", "8"], "multiple"),
    (["--dtype", "float16"], "dtype"),
    (["--resume"], "no checkpoint"),
    (["--accumulation-steps", "2", "--batch-size", "8"], "not both"),
    (["--epochs", "inf"], "--epochs"),
    (["--lr", "inf"], "--lr"),
    (["--device", "meta"], "--device meta"),
    (["--seed", "-1"], "--seed"),
    (["--memory-budget", "4GB"], "--memory-budget"),
    (["--output", "{good}"], "good.jsonl"),
    (["--output", "{good}/sub"], "good.jsonl"),
])
def test_bad_arguments(tmp_path, capsys, args, fragment):
    good = _good(tmp_path)
    argv = ["train", "--data", str(good), "--output", str(tmp_path / "out"), "--no-progress",
            *([] if "--epochs" in args else ["--max-steps", "1"]), *(arg.format(good=good) for arg in args)]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert good.read_text().count("\n") == 8  # an --output naming the data file left it alone


def test_lone_surrogate_in_the_data_names_file_and_line(tmp_path, capsys):
    """JSON may spell a lone UTF-16 surrogate (\\ud800), which no tokenizer can encode."""
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "x \\ud800 y", "completion": "b"}\n')
    code = main(["train", "--data", str(path), "--output", str(tmp_path / "out"), "--no-progress",
                 "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "surrogate.jsonl:2" in err and "prompt" in err, err
    assert not (tmp_path / "out").exists()


def test_output_folder_of_another_run_is_refused(tmp_path, capsys):
    base = ["train", "--data", str(_good(tmp_path)), "--output", str(tmp_path / "out"), "--no-progress",
            "--max-steps", "1", "--eval-every", "0", "--batch-size", "4", "--micro-batch-size", "4"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--lr", "0.5"]) == 2
    assert "different run" in capsys.readouterr().err
    assert main(base + ["--lr", "0.5", "--overwrite"]) == 0


def test_no_traceback_from_the_console_script(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    proc = subprocess.run([sys.executable, "-m", "gradaccum", "train", "--data", str(tmp_path / "bad.jsonl"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "bad.jsonl:1" in proc.stderr


FREED_BLOCK_PROBE = """
import ctypes, sys
import gradaccum.cli as cli
if sys.argv[1] == "fixed":
    assert cli._return_large_blocks_to_the_kernel()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1])
def touched(num_bytes):
    block = libc.malloc(num_bytes)
    ctypes.memset(block, 1, num_bytes)
    return block
libc.free(touched(16 << 20))  # a large block freed: glibc's dynamic threshold would now rise to 16 MiB
before = rss_kib()
libc.free(touched(8 << 20))
print(rss_kib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_cli_returns_freed_large_blocks_to_the_kernel():
    """An 8 MiB block freed after a 16 MiB one stays resident under glibc's dynamic threshold (so the
    first backward's transients pinned ~760 MiB under AdamW's state); with the CLI's fixed
    threshold it is unmapped on free."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    kept = {mode: int(subprocess.run([sys.executable, "-c", FREED_BLOCK_PROBE, mode], env=env, capture_output=True,
                                     text=True, check=True).stdout) for mode in ("glibc default", "fixed")}
    assert kept["glibc default"] >= 7 * 1024, kept  # the control: the block stayed resident
    assert kept["fixed"] < 1024, kept


def test_lone_surrogate_in_audit_data_is_one_line(tmp_path, capsys):
    """The audit reads data through the same checks as train."""
    path = tmp_path / "surrogate.jsonl"
    path.write_text("".join('{"prompt": "p%d =", "completion": " c"}\n' % i for i in range(8))
                    + '{"prompt": "x", "completion": "\\udc00"}\n')
    code = main(["audit", "--data", str(path), "--batch-size", "4", "--steps", "1", "--output",
                 str(tmp_path / "audit"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "surrogate.jsonl:9" in err and "completion" in err, err


def test_only_user_errors_become_one_line(tmp_path, monkeypatch, capsys):
    """A GradaccumError is the user's mistake (one line, exit 2); any other exception is our bug and
    keeps its traceback, even a ValueError."""
    import gradaccum.train as train_module
    from gradaccum.errors import DataError

    for error, one_line in ((DataError("data.jsonl:3: field 'text': bad"), True), (ValueError("a bug"), False)):
        def fail(config, error=error):
            raise error

        monkeypatch.setattr(train_module, "train", fail)
        argv = ["train", "--data", str(_good(tmp_path)), "--output", str(tmp_path / "out"), "--no-progress"]
        if one_line:
            assert main(argv) == 2
            assert capsys.readouterr().err.strip() == "gradaccum train: error: data.jsonl:3: field 'text': bad"
        else:
            with pytest.raises(ValueError, match="a bug"):
                main(argv)


def _alpaca_json(path):
    path.write_text(json.dumps([{"instruction": f"add {i}", "input": "" if i % 2 else f"{i} + 1",
                                 "output": str(i + 1)} for i in range(8)]))
    return path


def _sharegpt_jsonl(path):
    path.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"copy: w{i} ="},
                                                          {"from": "gpt", "value": f"w{i}"}]}) + "\n"
                            for i in range(8)))
    return path


@pytest.mark.parametrize("kind, extra, note", [
    ("alpaca", [], "prompt/completion pairs: through the chat template"),
    ("alpaca", ["--no-chat-template"], "prompt/completion pairs: as raw text"),
    ("sharegpt", [], None),
])
def test_alpaca_and_sharegpt_files_train_end_to_end(tmp_path, capsys, kind, extra, note):
    """The tiny preset trains 2 steps on an Alpaca JSON array and on ShareGPT JSON Lines; the log says
    how prompt/completion pairs were read (ShareGPT has none)."""
    data = _alpaca_json(tmp_path / "a.json") if kind == "alpaca" else _sharegpt_jsonl(tmp_path / "s.jsonl")
    code = main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--no-progress", "--max-steps",
                 "2", "--batch-size", "4", "--micro-batch-size", "2", "--eval-every", "0", "--save-every", "0",
                 "--no-save-final", *extra])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["num_targets"] > 0 for m in metrics)
    assert "data: 8 examples from" in out
    assert [line for line in out.splitlines() if line.startswith("prompt/completion pairs:")] == ([note] if note
                                                                                                   else [])
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert config["format"] == "auto" and config["chat_template"] == (extra == [])


@pytest.mark.parametrize("name, text, expected", [
    ("bad.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}]),
     "bad.json:2: field 'output': expected a string, got int"),
    ("bad.csv", "instruction,input,output\na,,b\nc,d\n", "bad.csv:3: 2 fields, but the header (line 1) has 3"),
    ("bad.jsonl", '{"conversations": [{"from": "human", "value": "a"}]}\n'
                  '{"conversations": [{"from": "bot", "value": "b"}]}\n',
     "bad.jsonl:2: field 'conversations[0].from': 'bot' is not one of human, gpt, system"),
])
def test_malformed_row_of_any_file_type_is_one_line(tmp_path, capsys, name, text, expected):
    (tmp_path / name).write_text(text)
    code = main(["train", "--data", str(tmp_path / name), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == f"gradaccum train: error: {tmp_path / name}:{expected.split(':', 1)[1]}", err


def test_format_override_and_unknown_format(tmp_path, capsys):
    """Keys of two formats are refused unless --format picks one; an unknown --format is one line."""
    path = tmp_path / "both.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"i{i}", "output": f"o{i}", "text": f"t{i}"}) + "\n"
                            for i in range(8)))
    base = ["train", "--data", str(path), "--no-progress", "--max-steps", "1", "--batch-size", "4",
            "--micro-batch-size", "4", "--eval-every", "0", "--save-every", "0", "--no-save-final"]
    assert main(base + ["--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "both.jsonl:1: fields" in err and "--format text|alpaca" in err, err
    assert main(base + ["--output", str(tmp_path / "b"), "--format", "alpaca"]) == 0
    assert "prompt/completion pairs: through the chat template" in capsys.readouterr().out
    assert main(base + ["--output", str(tmp_path / "c"), "--format", "chatml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--format: unknown value 'chatml'" in err, err


@pytest.mark.parametrize("command", ["train", "audit"])
def test_format_and_chat_template_flags_in_help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--format FORMAT record format of --data/--eval-data: auto" in out
    assert "--chat-template, --no-chat-template" in out
    assert "a datasets folder (DIR[:SPLIT])" in out


def test_version(capsys):
    import gradaccum

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradaccum {gradaccum.__version__}"


def test_on_off_flags_show_their_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: --no-packing)" in text and "(default: --progress)" in text
