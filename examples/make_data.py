"""Regenerate the bundled data from `gradaccum.tasks` with fixed seeds.

    python examples/make_data.py

Writes
    src/gradaccum/assets/train.jsonl, eval.jsonl   the default run's prompt/completion split, shipped
                                                   inside the package (eval prompts never occur in train)
    examples/data/chat.jsonl                       {"messages": [...]} format example
    examples/data/text.jsonl                       {"text": ...} format example
    examples/data/alpaca.json                      Alpaca format example, a JSON array
    examples/data/sharegpt.jsonl                   ShareGPT format example

The prompt/completion format's example is the bundled split itself: src/gradaccum/assets/train.jsonl.

The output is a pure function of the seeds, so rerunning it leaves the files unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gradaccum import tasks

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"
ASSETS = ROOT / "src" / "gradaccum" / "assets"
NUM_FORMAT_EXAMPLES = 50
FORMAT_SEED = 2


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # "\n" line endings on every platform, so the files are byte-identical everywhere.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"wrote {len(records):5d} records, {path.stat().st_size / 1024:6.1f} KiB: {path.relative_to(ROOT)}")


def write_json(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(records, indent=1) + "\n")
    print(f"wrote {len(records):5d} records, {path.stat().st_size / 1024:6.1f} KiB: {path.relative_to(ROOT)}")


def alpaca_record(pair: dict) -> dict:
    """"reverse: abc =" -> instruction "reverse", input "abc"; a prompt with no ":" has no input."""
    prompt = pair["prompt"].removesuffix(" =")
    instruction, _, given = prompt.partition(": ")
    return {"instruction": instruction, "input": given, "output": pair["completion"].strip()}


def sharegpt_record(chat: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in chat["messages"]]}


def chat_records(pairs: list[dict], rng: random.Random) -> list[dict]:
    """Conversations built from task pairs: some with a system message, some with two exchanges."""
    records = []
    for start in range(0, 2 * NUM_FORMAT_EXAMPLES, 2):
        first, second = pairs[start], pairs[start + 1]
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "Answer with the result only."})
        messages += [{"role": "user", "content": first["prompt"]},
                     {"role": "assistant", "content": first["completion"].strip()}]
        if rng.random() < 0.4:  # multi-turn: loss on both assistant turns, not on the user turns
            messages += [{"role": "user", "content": second["prompt"]},
                         {"role": "assistant", "content": second["completion"].strip()}]
        records.append({"messages": messages})
    return records


def main() -> None:
    train, held_out = tasks.train_eval_split()
    write_jsonl(ASSETS / "train.jsonl", train)
    write_jsonl(ASSETS / "eval.jsonl", held_out)

    pairs = tasks.generate(3 * NUM_FORMAT_EXAMPLES, seed=FORMAT_SEED)
    write_jsonl(EXAMPLES / "chat.jsonl", chat_records(pairs, random.Random(FORMAT_SEED)))
    text = [{"text": record["prompt"] + record["completion"]} for record in pairs[-NUM_FORMAT_EXAMPLES:]]
    write_jsonl(EXAMPLES / "text.jsonl", text)

    more = tasks.generate(3 * NUM_FORMAT_EXAMPLES, seed=FORMAT_SEED + 1)
    write_json(EXAMPLES / "alpaca.json", [alpaca_record(pair) for pair in more[:NUM_FORMAT_EXAMPLES]])
    chats = chat_records(more[NUM_FORMAT_EXAMPLES:], random.Random(FORMAT_SEED + 1))
    write_jsonl(EXAMPLES / "sharegpt.jsonl", [sharegpt_record(chat) for chat in chats])


if __name__ == "__main__":
    main()
