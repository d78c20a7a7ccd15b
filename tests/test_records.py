"""gradaccum.records: every file type and record format read, detected, and refused by file, record and field;
and how tokenize trains the new formats (Alpaca, ShareGPT, prompt/completion through a chat template)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gradaccum.data import IGNORE_INDEX, DataError, collate, generation_pair, read_jsonl, read_records, tokenize

import toy_tokenizers as toy

TEXT = [{"text": "hello world"}, {"text": "123"}, {"text": ""}]
PAIRS = [{"prompt": "a =", "completion": " b"}, {"prompt": "copy: x =", "completion": ""}]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
ALPACA = [{"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
          {"instruction": "Say hi.", "input": "", "output": "hi"},
          {"instruction": "Count to two.", "output": "1 2"}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "yo"}, {"from": "human", "value": "again"},
                               {"from": "gpt", "value": "yo yo"}]}]
BY_FORMAT = {"text": TEXT, "prompt_completion": PAIRS, "messages": MESSAGES, "alpaca": ALPACA, "sharegpt": SHAREGPT}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_csv(path: Path, records: list[dict], delimiter: str = ",") -> Path:
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(columns)
        for record in records:
            writer.writerow([json.dumps(record[c]) if isinstance(record.get(c), list) else record.get(c, "")
                             for c in columns])
    return path


def columns_of(records: list[dict]) -> dict[str, list]:
    """Every key of every record as a column (None where a record lacks it): from_pylist reads only the first."""
    keys = dict.fromkeys(key for record in records for key in record)
    return {key: [record.get(key) for record in records] for key in keys}


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns_of(records)), path)
    return path


def write_dataset(path: Path, records: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_dict(columns_of(records)).save_to_disk(str(path))
    return path


WRITERS = {"data.jsonl": write_jsonl, "data.json": write_json, "data.csv": write_csv,
           "data.tsv": lambda p, r: write_csv(p, r, "\t"), "data.parquet": write_parquet, "saved": write_dataset}


# ---- every file type x every format -------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BY_FORMAT))
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_file_type_reads_every_format(tmp_path, name, kind):
    records = BY_FORMAT[kind]
    path = WRITERS[name](tmp_path / name, records)
    read = read_records(path)
    first = 2 if name.endswith("sv") else 1  # CSV/TSV: the header is line 1
    assert [number for number, _ in read] == list(range(first, first + len(records)))
    if name in ("data.csv", "data.tsv"):  # every cell is a string: a missing "input" is an empty one
        records = [{"input": "", **r} if kind == "alpaca" else r for r in records]
    assert [record for _, record in read] == records


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "saved"])
def test_one_file_may_mix_formats(tmp_path, name):
    records = [r for kind in sorted(BY_FORMAT) for r in BY_FORMAT[kind]]
    read = read_records(WRITERS[name](tmp_path / name, records))
    # Tables hold every column in every row: a null cell is an absent field.
    assert [record for _, record in read] == records


def test_csv_numbers_are_the_line_where_a_row_starts(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"line one\nline two",x\n\n"a =", b\n"p",\n')
    assert [(n, r["completion"]) for n, r in read_records(path)] == [(2, "x"), (5, " b"), (6, "")]


# ---- malformed rows: the error names the file, the record and the field ----------------------------


@pytest.mark.parametrize("name, content, expected", [
    ("data.json", '[{"text": "a"},\n {"text": 5}]', r"data\.json:2: field 'text': expected a string, got int"),
    ("data.json", '[{"text": "a"}, ["x"]]', r"data\.json:2: expected a JSON object, got list"),
    ("data.json", '[{"text": "a"},\n {"text": }]', r"data\.json: invalid JSON at line 2, column 11"),
    ("data.json", '{\n  "text": "a"\n}\n', r"data\.json: one JSON object \(keys: 'text'\); expected an array"),
    ("data.json", '{"text": "a"}\n{"text": null}\n', r"data\.json:2: field 'text': expected a string, got null"),
    ("data.json", "[]", r"data\.json: no records"),
    ("data.csv", 'text\n"a\nb"\nc,d\n', r"data\.csv:4: 2 fields, but the header \(line 1\) has 1"),
    ("data.csv", "prompt\nx\n", r"data\.csv:2: field 'completion': missing"),
    ("data.csv", "text,text\na,b\n", r"data\.csv:1: column 'text' appears twice"),
    ("data.csv", 'conversations\n"[{""from"": ""human"", ""value"": ""hi""}]"\n"[{""from"": ""bot"", ""value"": ""x""}]"\n',
     r"data\.csv:3: field 'conversations\[0\]\.from': 'bot' is not one of human, gpt, system"),
    ("data.csv", 'messages\n"[{""role"": ""user"""\n', r"data\.csv:2: field 'messages': invalid JSON"),
    ("data.tsv", "instruction\toutput\nx\n", r"data\.tsv:2: 1 fields, but the header \(line 1\) has 2"),
    ("data.csv", b"text\nok\n\xff\n", r"data\.csv:3: not valid UTF-8"),
    ("data.csv", "", r"data\.csv: no records"),
    ("data.parquet", b"not parquet", r"data\.parquet: cannot read as parquet"),
])
def test_malformed_files_name_file_record_and_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=expected):
        read_records(path)


MALFORMED_RECORDS = [
    ({"instruction": "x", "output": 3}, r":2: field 'output': expected a string, got int"),
    ({"instruction": "x", "input": ["y"], "output": "z"}, r":2: field 'input': expected a string, got list"),
    ({"input": "y", "output": "z"}, r":2: field 'instruction': missing \(an Alpaca record needs"),
    ({"conversations": []}, r":2: field 'conversations': expected a non-empty list of messages, got an empty list"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     r":2: field 'conversations\[1\]\.from': 'bot' is not one of human, gpt, system"),
    ({"conversations": [{"from": "human"}]}, r":2: field 'conversations\[0\]\.value': missing"),
    ({"conversations": [{"from": "human", "value": "\ud800"}]},
     r":2: field 'conversations\[0\]\.value': holds a lone UTF-16 surrogate"),
    ({"instruction": "\udfff", "output": "z"}, r":2: field 'instruction': holds a lone UTF-16 surrogate"),
    ({"text": "x", "instruction": "y", "output": "z"},
     r":2: fields \['text', 'instruction', 'output'\] belong to different formats \(text, alpaca\)"),
]


@pytest.mark.parametrize("name, record, expected", [
    (name, record, expected) for name in ["data.jsonl", "data.json", "data.parquet", "saved"]
    for record, expected in MALFORMED_RECORDS
    if "surrogate" not in expected or name.startswith("data.js")  # Arrow strings are always valid UTF-8
])
def test_malformed_records_in_each_file_type(tmp_path, name, record, expected):
    path = WRITERS[name](tmp_path / name, [{"text": "fine"}, record, {"text": "fine"}])
    with pytest.raises(DataError, match=expected) as error:
        read_records(path)
    assert str(error.value).startswith(f"{path}:2: ")


def test_saved_dataset_with_nulls_names_the_record(tmp_path):
    records = [{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "user", "content": None}]}]
    path = write_dataset(tmp_path / "saved", records)
    with pytest.raises(DataError, match=r"saved:2: field 'messages\[0\]\.content': expected a string, got null"):
        read_records(path)
    path = write_parquet(tmp_path / "d.parquet", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(DataError, match=r"d\.parquet:2: field 'output': missing"):
        read_records(path)


# ---- the format override ---------------------------------------------------------------------------

# Hugging Face's tatsu-lab/alpaca has a "text" column beside instruction/input/output.
TATSU = [{"instruction": "Add.", "input": "1 + 1", "output": "2", "text": "### Instruction: Add. ... 2", "id": 7}]


def test_keys_of_two_formats_are_refused_until_a_format_is_named(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", TATSU)
    with pytest.raises(DataError, match=r"a\.jsonl:1: fields .* belong to different formats \(text, alpaca\); "
                                        r"choose one with format= \(--format text\|alpaca\)"):
        read_records(path)
    [(_, alpaca)] = read_records(path, format="alpaca")
    assert alpaca == {"instruction": "Add.", "input": "1 + 1", "output": "2", "id": 7}  # other keys stay
    [(_, text)] = read_jsonl(path, format="text")
    assert text == {"text": TATSU[0]["text"], "id": 7}
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'messages': missing"):
        read_records(path, format="messages")
    with pytest.raises(DataError, match=r"format 'chatml': expected one of auto, text, prompt_completion"):
        read_records(path, format="chatml")


def test_format_override_reads_a_csv_with_extra_columns(tmp_path):
    path = write_csv(tmp_path / "a.csv", TATSU)
    [(number, record)] = read_records(path, format="alpaca")
    assert number == 2 and record == {"instruction": "Add.", "input": "1 + 1", "output": "2", "id": "7"}


# ---- datasets folders ------------------------------------------------------------------------------


def test_dataset_dict_takes_train_or_the_named_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(TEXT), "test": Dataset.from_list(PAIRS)}).save_to_disk(tmp_path / "dd")
    assert [r for _, r in read_records(tmp_path / "dd")] == TEXT
    assert [r for _, r in read_records(f"{tmp_path / 'dd'}:test")] == PAIRS
    with pytest.raises(DataError, match=r"dd:dev: no split 'dev' \(splits: 'train', 'test'\)"):
        read_records(f"{tmp_path / 'dd'}:dev")
    DatasetDict({"validation": Dataset.from_list(TEXT)}).save_to_disk(tmp_path / "val")
    with pytest.raises(DataError, match=r"val: no split 'train' \(splits: 'validation'\); name one as .*val:SPLIT"):
        read_records(tmp_path / "val")
    write_dataset(tmp_path / "one", TEXT)
    with pytest.raises(DataError, match=r"one:train: .* holds one dataset, not splits"):
        read_records(f"{tmp_path / 'one'}:train")
    with pytest.raises(DataError, match=r"is a directory, but not one saved by datasets' save_to_disk"):
        read_records(tmp_path)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")


def test_tables_without_a_known_column_say_which_columns_they_have(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"d\.parquet: no column of a known format.*'question', 'answer'"):
        read_records(path)


# ---- tokenize: what each format trains on ------------------------------------------------------------


def chat_of(prompt: str, completion: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


@pytest.mark.parametrize("kind", ["byte_level", "metaspace_always"])
def test_prompt_completion_goes_through_the_chat_template_by_default(kind):
    tokenizer = toy.toy_tokenizer(kind, "chatml")
    records = [(3, {"prompt": "a =", "completion": " b"}), (4, {"prompt": "copy: x =", "completion": ""})]
    examples, stats = tokenize(records, tokenizer, max_length=100)
    as_chat, _ = tokenize([chat_of(r["prompt"], r["completion"]) for _, r in records], tokenizer, max_length=100)
    assert [(e.input_ids, e.labels) for e in examples] == [(e.input_ids, e.labels) for e in as_chat]
    assert stats.pairs_as == "chat" and stats.num_by_format == {"prompt_completion": 2}
    assert stats.num_empty_completions == 1
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [label for label in examples[1].labels if label != IGNORE_INDEX][0] == end  # "" still learns to stop

    raw, raw_stats = tokenize(records, tokenizer, max_length=100, chat_template=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert raw[0].input_ids == [bos] + tokenizer("a = b", add_special_tokens=False)["input_ids"] + [eos]
    assert raw_stats.pairs_as == "raw"
    # A tokenizer without a template: raw, whatever chat_template says.
    no_template, stats = tokenize(records, toy.toy_tokenizer(kind, None), max_length=100)
    assert [e.input_ids for e in no_template] == [e.input_ids for e in raw] and stats.pairs_as == "raw"
    assert tokenize([{"text": "x"}], tokenizer, max_length=10)[1].pairs_as is None


def test_alpaca_is_a_user_turn_with_a_chat_template_and_a_prompt_without():
    tokenizer = toy.toy_tokenizer("byte_level", "chatml")
    records = list(enumerate(ALPACA + [{"instruction": "Say hi.", "input": None, "output": "hi"}], start=1))
    examples, stats = tokenize(records, tokenizer, max_length=200)
    users = ["Reverse the word.\n\nabc", "Say hi.", "Count to two.", "Say hi."]
    expected, _ = tokenize([chat_of(u, r["output"]) for u, (_, r) in zip(users, records)], tokenizer, max_length=200)
    assert [(e.input_ids, e.labels) for e in examples] == [(e.input_ids, e.labels) for e in expected]
    assert stats.num_by_format == {"alpaca": 4} and stats.pairs_as == "chat"

    raw, stats = tokenize(records, tokenizer, max_length=200, chat_template=False)
    pairs = [{"prompt": u + "\n\n", "completion": r["output"]} for u, (_, r) in zip(users, records)]
    expected, _ = tokenize(pairs, tokenizer, max_length=200, chat_template=False)
    assert [(e.input_ids, e.labels) for e in raw] == [(e.input_ids, e.labels) for e in expected]
    assert tokenizer.decode([t for t in raw[0].labels if t != IGNORE_INDEX]) == "cba</s>"


def test_sharegpt_is_its_conversation_as_messages():
    tokenizer = toy.toy_tokenizer("byte_level", "chatml")
    [example], stats = tokenize([(1, SHAREGPT[0])], tokenizer, max_length=300)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in SHAREGPT[0]["conversations"]]
    [expected], _ = tokenize([(1, {"messages": messages})], tokenizer, max_length=300)
    assert (example.input_ids, example.labels) == (expected.input_ids, expected.labels)
    assert stats.num_by_format == {"sharegpt": 1}
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'conversations': the tokenizer has no chat template"):
        tokenize([(1, SHAREGPT[0])], toy.toy_tokenizer("byte_level", None), max_length=300, path="s.jsonl")


def test_errors_in_the_chat_path_name_the_records_own_fields():
    failing = toy.toy_tokenizer("byte_level", None)
    failing = type(failing)(tokenizer_object=failing.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                            chat_template="{{ raise_exception('no system role') }}")
    for record, field in [(SHAREGPT[0], "'conversations'"), (PAIRS[0], "'prompt'/'completion'"),
                          (ALPACA[0], "'instruction'/'output'")]:
        with pytest.raises(DataError, match=f"f\\.jsonl:5: field {field}: the chat template failed"):
            tokenize([(5, record)], failing, max_length=100, path="f.jsonl")


@pytest.mark.parametrize("chat_template", [True, False])
def test_generation_pair_is_the_prefix_training_saw(chat_template):
    tokenizer = toy.toy_tokenizer("byte_level", "chatml")
    for record in [PAIRS[0], ALPACA[0], ALPACA[2]]:
        [example], _ = tokenize([record], tokenizer, max_length=200, chat_template=chat_template)
        ids, completion = generation_pair(record, tokenizer, chat_template=chat_template)
        assert completion == record.get("completion", record.get("output"))
        assert example.input_ids[:len(ids)] == ids
        assert all(label == IGNORE_INDEX for label in example.labels[:len(ids)])
        assert example.labels[len(ids)] != IGNORE_INDEX  # the completion starts right after
    assert generation_pair(TEXT[0], tokenizer) is None and generation_pair(SHAREGPT[0], tokenizer) is None


def test_the_readme_own_loop_data_lines(tmp_path):
    """README, 'Use it in your own loop': records to micro-batches in three lines."""
    from gradaccum.models import build_tokenizer

    tokenizer = build_tokenizer()
    path = write_parquet(tmp_path / "my.parquet", ALPACA)
    examples, stats = tokenize(read_records(path), tokenizer, max_length=512)
    batches = [collate(examples[i:i + 2], tokenizer.pad_token_id) for i in range(0, len(examples), 2)]
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1] and stats.pairs_as == "chat"
    assert sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches) == stats.num_target_tokens
