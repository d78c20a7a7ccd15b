"""`gradaccum train | audit | check`: parse, call, print.

A user's mistake (`GradaccumError`) is one line on stderr and exit status 2; any other exception
keeps its traceback, because it is our bug. Parsing needs only config.py, which imports no torch, so
`gradaccum --help` answers at once; a command's module is imported once the command is chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

from .config import AuditConfig, TrainConfig
from .errors import GradaccumError


@dataclass(frozen=True)
class Command:
    help: str
    module: str  # its main(args: argparse.Namespace) -> exit status runs the command
    config: type | None = None  # flags generated from this dataclass; None: the module's add_arguments(parser)
    description: str | None = None


# Every subcommand, registered here and nowhere else.
COMMANDS = {
    "train": Command("fine-tune a model with exact gradient accumulation", "gradaccum.train", TrainConfig,
                     "Fine-tune a causal LM. With no arguments: the embedded tiny model on the bundled tasks, "
                     "on the CPU, in a few minutes."),
    "audit": Command("full batch vs naive vs exact accumulation on your model and data", "gradaccum.audit",
                     AuditConfig),
    "check": Command("answer in seconds whether accumulation with a model equals the big batch",
                     "gradaccum.check"),
}


def main(argv: list[str] | None = None) -> int:
    _return_large_blocks_to_the_kernel()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(chosen=next((arg for arg in argv if not arg.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    settings = None
    try:
        settings = _settle(args)
        return importlib.import_module(COMMANDS[args.command].module).main(args)
    except GradaccumError as exc:  # the user's mistake; anything else is our bug: a traceback
        if os.environ.get("GRADACCUM_DEBUG"):
            raise
        message = settings.locate(exc) if settings is not None else exc  # a value from --config: where
        print(f"gradaccum {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradaccum {args.command}: interrupted", file=sys.stderr)
        return 130


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments of a command line as its command gets them: defaults < --config FILE < flags."""
    args = build_parser(chosen=next((arg for arg in argv if not arg.startswith("-")), None)).parse_args(argv)
    if args.command is not None:
        _settle(args)
    return args


def _settle(args: argparse.Namespace) -> Any:
    """Fill in every field of a dataclass command: the flags given, over --config's values, over the
    defaults (the parser leaves out the flags not given, so that a file can set them). Returns the
    file's settings (config_file.SettingsFile), or None."""
    command = COMMANDS[args.command]
    subparser = vars(args).pop("_parser", None)
    if command.config is None:
        return None
    from .config_file import resolve

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(command.config) if hasattr(args, f.name)}
    others = {name: other.config for name, other in COMMANDS.items() if other.config and name != args.command}
    values, settings = resolve(given, args.config, command.config, args.command, others,
                               missing=lambda flags: subparser.error(f"the following arguments are required: "
                                                                     f"{', '.join(flags)} (as flags or in --config "
                                                                     "FILE)"))
    for name, value in values.items():
        setattr(args, name, value)
    return settings


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; a command whose flags its own module defines gets them only when `chosen`."""
    parser = argparse.ArgumentParser(prog="gradaccum", description="Gradient accumulation that is exactly a big "
                                     "batch: fine-tune language models on small memory.")
    from . import __version__  # the package's __init__ imports no torch

    parser.add_argument("--version", action="version", version=f"gradaccum {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.description or command.help)
        if command.config is not None:
            sub.add_argument("--config", metavar="FILE", default=None,
                             help="settings from a YAML (.yaml/.yml) or JSON file, keys named as these flags "
                                  "(max_length or max-length); flags given here override it; a run's "
                                  "run_config.json trains that run again")
            add_dataclass_arguments(sub, command.config)
            sub.set_defaults(_parser=sub)  # _settle reports a required flag that neither gives
        elif name == chosen:
            importlib.import_module(command.module).add_arguments(sub)
    return parser


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field, with the field's doc as help (booleans get --no-flag); a field
    without a default is a required flag. Inherited fields (RunConfig's) are listed as their own group.
    A flag not given is left out of the namespace (argparse.SUPPRESS): `_settle` fills it in from
    --config or the default, and checks the required ones."""
    hints = typing.get_type_hints(cls)
    bases = [base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)]
    inherited = {f.name for f in dataclasses.fields(bases[0])} if bases else set()
    fields = dataclasses.fields(cls)
    shared = parser.add_argument_group("model, data and run (shared by train and audit)") if inherited else parser
    for f in fields:
        _add_field(shared if f.name in inherited else parser, f, _base_type(hints[f.name]))


def _add_field(parser: Any, f: dataclasses.Field, kind: type) -> None:
    flag = "--" + f.name.replace("_", "-")
    required = f.default is MISSING
    default = None if required else f.default
    text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
    if kind is bool:
        shown = flag if default else "--no-" + flag[2:]  # on/off flags say which side is the default
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=f"{text} (default: {shown})")
    else:
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=f"{text} (required)" if required else text if default is None
                            else f"{text} (default: {default})")


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `int | str` -> str (the dataclass validates what the string holds)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return str if str in args else args[0]
    return annotation


# Blocks of this many bytes and more are their own mappings, returned to the kernel on free.
MMAP_THRESHOLD_BYTES = 4 * 2 ** 20


def _return_large_blocks_to_the_kernel() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES, so that freed activations never pin memory.

    glibc raises its threshold to the size of each large block freed (up to 32 MiB), after which
    blocks below it come from the heap, and a freed heap block stays resident while anything above
    it lives: the first backward's transients then hold their pages under the AdamW state allocated
    after them. Fixed at 4 MiB, SmolLM2-135M at 1,700 tokens peaked 760 MiB lower (2,901 vs 3,660
    MiB, benchmarks/results/long_prompts.md), for ~7% more system time (freed blocks fault in again).
    torch's huge pages (THP_MEM_ALLOC_ENABLE=1), which the CLI used to ask for, then cost more than
    they saved: 0.96x vs 0.87x of HF Trainer's wall at 2 x 256 tokens (benchmarks/results/vs_hf.md).
    A MALLOC_MMAP_THRESHOLD_ the user set is kept (glibc read it at start). Returns whether it was set.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


if __name__ == "__main__":
    raise SystemExit(main())
