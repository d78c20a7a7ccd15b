"""`--config FILE`: a command's settings from a YAML or JSON file.

The keys are the flags' names without the dashes, spelt either way (`max_length` or `max-length`).
What wins: the defaults < the file < the flags given on the command line; a flag also drops the
file's value of the settings it excludes (config.excluded_by: `--epochs` the file's `max_steps`). A
`run_config.json` that a run wrote holds exactly its config's fields, so `gradaccum train --config
runs/x/run_config.json` trains that run again (give a new `--output`); it records --resume and
--overwrite as false, and a file may not turn them on (config.COMMAND_LINE_ONLY). Values are checked
as the flags' are: the file's strings go through the flag's type, a string setting takes a plain
YAML scalar's text as written (not YAML 1.1's reading of `12:30` or `0755`), and the dataclass's own
checks (`__post_init__`) run on the merged settings, their message prefixed with the file and line
when the value came from the file. YAML merge keys (`<<`) merge as YAML says: the keys beside win.
No torch here: the CLI reads the file before it imports a command.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable

from .config import COMMAND_LINE_ONLY, excluded_by
from .errors import ConfigError

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          type(None): "null"}


@dataclasses.dataclass
class SettingsFile:
    path: str
    values: dict[str, Any]  # field name -> value, checked against the field's type
    keys: dict[str, str]  # field name -> the key as the file spells it
    lines: dict[str, int]  # field name -> its line in the file (where known)

    overridden: set[str] = dataclasses.field(default_factory=set)  # fields a flag set as well: the flag won

    def where(self, name: str | None = None) -> str:
        line = self.lines.get(name) if name else None
        return f"{self.path}:{line}" if line else self.path

    def locate(self, error: Exception) -> str:
        """A ConfigError's message, prefixed with FILE:LINE when the first flag it names took its value
        from this file (the message then matches the flag's, with where the value came from)."""
        from_file = [name for name in self.values if name not in self.overridden]
        named = next((name for flag in re.findall(r"--[a-z][a-z0-9-]*", str(error)) for name in from_file
                      if _flag(name) == flag), None) if isinstance(error, ConfigError) else None
        return f"{self.where(named)}: {error}" if named else str(error)


def resolve(given: dict[str, Any], path: str | None, cls: type, command: str, others: dict[str, type],
            missing: Callable[[list[str]], None]) -> tuple[dict[str, Any], SettingsFile | None]:
    """Every field of `cls`: the flags given (`given`) over the file's values over the defaults; and the
    file's settings (None without --config), whose `locate` places later errors in the file.

    `others` maps the other commands to their config classes (to name a key that belongs to one);
    `missing(flags)` is called with the required flags that neither the command line nor the file set.
    Raises ConfigError, naming the file and line, for anything wrong in the file.
    """
    settings = read(path, cls, command, others) if path is not None else None
    if settings is not None:
        settings.overridden = set(given)
        for name, value in given.items():  # `--epochs 2` replaces the file's `max_steps: 20`
            for other in excluded_by(name, value):
                if other not in given:
                    settings.values.pop(other, None)
    values = {**(settings.values if settings else {}), **given}
    fields = dataclasses.fields(cls)
    if absent := [_flag(f.name) for f in fields if f.default is MISSING and f.name not in values]:
        missing(absent)
    try:
        cls(**values)  # the flags' own checks; the command builds its config again from these values
    except ConfigError as exc:
        if settings is None:
            raise
        raise ConfigError(settings.locate(exc)) from None
    return {f.name: values.get(f.name, f.default) for f in fields}, settings


def read(path: str, cls: type, command: str, others: dict[str, type]) -> SettingsFile:
    """The file's settings for `cls`, each value checked against its field's type."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path}: expected a .yaml, .yml or .json file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    data, pairs = _parse_json(path, text) if suffix == ".json" else _parse_yaml(path, text)
    if not isinstance(data, dict):
        got = "an empty file" if data is _EMPTY else "null" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: expected a mapping of settings (name: value), got {got}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    settings = SettingsFile(path, {}, {}, {})
    for key, line, text in pairs:
        where = f"{path}:{line}" if line else path
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in names:
            raise ConfigError(f"{where}: {_unknown(key, name, names, command, others)}")
        if name in settings.keys:
            also = f" (also on line {settings.lines[name]})" if settings.lines.get(name) else ""
            raise ConfigError(f"{where}: {key!r} is set twice{also}")
        settings.keys[name] = key
        if line:
            settings.lines[name] = line
        settings.values[name] = _checked(data[key], hints[name], f"{where}: {key}", text)
        if name in COMMAND_LINE_ONLY and settings.values[name]:
            raise ConfigError(f"{where}: {key}: true is not taken from a settings file (it would act on every run "
                              f"made from the file; run_config.json records it as false): pass {_flag(name)} on "
                              "the command line")
    return settings


def _unknown(key: Any, name: Any, names: set[str], command: str, others: dict[str, type]) -> str:
    owner = next((other for other, cls in others.items()
                  if name in {f.name for f in dataclasses.fields(cls)}), None)
    if owner is not None:
        return f"{key!r} is a setting of `gradaccum {owner}`, not of `gradaccum {command}`"
    close = difflib.get_close_matches(str(name), sorted(names), n=1)
    return f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _checked(value: Any, annotation: Any, what: str, text: str | None = None) -> Any:
    """`value` as the field's type allows; a string goes through the flag's type (int('8'), float('3e-3')).

    `text`: the value as the file wrote it (a plain YAML scalar), which a string setting takes rather
    than what YAML 1.1 read in it (`12:30` is 750 in base 60, `0755` is octal 493, `1_2` is 12).
    """
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    allowed = tuple(typing.get_origin(a) or a for a in (typing.get_args(annotation) if union else (annotation,)))
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool) != (bool in allowed):  # True is an int to Python, not to a flag
        quote = str in allowed and isinstance(value, bool) and text is not None  # `output: yes`
        return _refuse(value, allowed, what, f" (quote it, '{text}', if you mean the string)" if quote else "")
    if isinstance(value, allowed):
        return value
    if float in allowed and isinstance(value, int):
        return float(value)  # as `--lr 1` gives 1.0
    if isinstance(value, str):
        for kind in (int, float):
            if kind in allowed:
                try:
                    return kind(value)
                except ValueError:
                    return _refuse(value, allowed, what)
    if str in allowed and isinstance(value, (int, float)):
        return text if text is not None else str(value)  # memory_budget: 4000000000
    return _refuse(value, allowed, what)


def _refuse(value: Any, allowed: tuple[type, ...], what: str, hint: str = "") -> Any:
    expected = " or ".join(_KINDS.get(kind, kind.__name__) for kind in allowed if kind is not type(None))
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    raise ConfigError(f"{what}: expected {expected}, got {shown}{hint}")


_EMPTY = object()  # a YAML file without a document (only comments, or nothing)
Pairs = list[tuple[Any, "int | None", "str | None"]]  # each top-level key: its line, its plain scalar's text


def _parse_yaml(path: str, text: str) -> tuple[Any, Pairs]:
    import yaml

    loader = yaml.SafeLoader(text)  # safe: no tag builds a Python object
    try:
        node = loader.get_single_node()
        # The keys written in the mapping itself, before construction merges `<<`'s mappings in among them.
        local = {id(key) for key, _ in node.value} if isinstance(node, yaml.MappingNode) else set()
        data = loader.construct_document(node) if node is not None else _EMPTY
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()
    return data, _key_lines(node, data, local)


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in file order, duplicates kept."""


def _parse_json(path: str, text: str) -> tuple[Any, Pairs]:
    try:
        data = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, _Pairs):
        return _plain(data), []
    # JSON is YAML's flow style: the YAML composer finds each key's line (where it can read the file).
    try:
        import yaml

        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # noqa: BLE001 - lines are a courtesy; the values come from the JSON parser
        node = None
    composed = _key_lines(node, None)
    keys = [key for key, _ in data]
    lines = [line for _, line, _ in composed] if [key for key, _, _ in composed] == keys else [None] * len(keys)
    # A JSON number is what it says (no base 60, no octal): a string setting takes str(value).
    return {key: _plain(value) for key, value in data}, [(key, line, None) for key, line in zip(keys, lines)]


def _plain(value: Any) -> Any:
    """A value read with `object_pairs_hook=_Pairs` back to plain dicts and lists."""
    if isinstance(value, _Pairs):
        return {k: _plain(v) for k, v in value}
    return [_plain(v) for v in value] if isinstance(value, list) else value


def _key_lines(node: Any, data: Any, local: set[int] | None = None) -> Pairs:
    """Each top-level key with its line (1-based) and its plain scalar value's text, in file order,
    duplicates written in the mapping included; `local`: the ids of those keys' nodes (see `_parse_yaml`).

    Of the keys a YAML merge (`<<`) brought in, only those the mapping holds are kept: a key written
    beside `<<` wins over a merged one, and of `<<: [*a, *b]` the first mapping's.
    """
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return [(key, None, None) for key in data] if isinstance(data, dict) else []
    pairs, later = [], set()
    for key_node, value_node in reversed(node.value):  # construction assigned them in order: the last one won
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
        if isinstance(key_node, yaml.ScalarNode) and isinstance(data, dict) and key not in data:
            key = next((k for k in data if str(k) == key), key)  # a key YAML read as a number or bool
        merged = local is not None and id(key_node) not in local
        if not (merged and key in later):
            plain = isinstance(value_node, yaml.ScalarNode) and value_node.style is None
            pairs.append((key, key_node.start_mark.line + 1, value_node.value if plain else None))
        later.add(key)
    return pairs[::-1]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
