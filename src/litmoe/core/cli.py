"""What every command line here shares: flags parsed from a function's signature (jsonargparse), and every
expected mistake reported as one line on stderr with exit status 2, no traceback: a `UserError`, a dependency
that does not import, and an OS error on a path (a read-only or missing directory, a file where a directory
should be); any other exception keeps its traceback, since it is a bug.

On top of jsonargparse's parsing, users get what they type elsewhere: a bare boolean flag means true
(`--force`), and integer settings take integral scientific notation (`--train.max_tokens 2e6`).
"""

import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from litmoe.core.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE, RunStopped, UserError
from litmoe.core.peers import peer_failure, stop_run

# Noise from pinned dependencies: litdata asks PyPI for a newer version of itself (we pin it deliberately),
# LitData pins memory even when there is no accelerator to pin it for, and LitGPT's TrainArgs warns about
# max_steps, which its pretrain loop ignores (and litmoe.training.settings refuses).
KNOWN_WARNINGS = (
    "A newer version of litdata is available",
    "'pin_memory' argument is set as true",
    "`--train.lr_warmup_steps` should be less than `--train.max_steps`",
)


def quiet_known_warnings() -> None:
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def run_command(target: str, parses_its_flags: bool = False) -> None:
    """Run `target` ("package.module:function") as this script's command line, with its flags parsed from its
    signature unless it parses them itself. It is imported in here, so that a dependency that does not import
    (a version clash) is one line too, not a traceback from deep inside it."""
    module_name, function_name = target.split(":")

    def command() -> Any:
        quiet_known_warnings()
        function = getattr(importlib.import_module(module_name), function_name)
        return function() if parses_its_flags else run_function(function)

    run_cli(command)


def run_cli(main: Callable[[], Any]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ImportError as err:
        if (err.name or "").startswith("litmoe"):  # ours: a bug, with its traceback
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"error: a dependency does not import: {reason}; install the versions uv.lock pins (`uv sync`)",
            file=sys.stderr,
        )
        sys.exit(EXIT_USAGE)
    except BrokenPipeError:  # the reader went away (`generate.py ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        sys.exit(EXIT_BROKEN_PIPE)
    except OSError as err:
        if err.filename is None:  # not about a path: the system or a bug, shown with its traceback
            raise
        print(f"error: {one_line(f'{err.filename}: {err.strerror or err}')}; check this path and its permissions",
              file=sys.stderr)  # fmt: skip
        sys.exit(EXIT_USAGE)
    except RunStopped as stop:
        if stop.message:
            print(stop.message, file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        if (line := peer_failure(err)) is None:
            raise
        stop_run(one_line(line))


def one_line(message: str) -> str:
    """The message on one line, whatever it quotes: a path or value holding a line break or another control
    character shows it escaped, as Python's repr would."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)


def run_function(function: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """Call `function` with the flags of `argv` (default: sys.argv), as jsonargparse's CLI would."""
    types_of = flag_types(function)
    argv = normalize_flags(sys.argv[1:] if argv is None else argv, types_of)
    kwargs = vars(parse_arguments(function_parser(function), argv, types_of))
    kwargs.pop("config", None)
    return function(**kwargs)


def function_parser(function: Callable[..., Any], **kwargs: Any):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docs of dataclass arguments
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False, **kwargs)  # --train.max_token is no flag
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of these settings.")
    parser.add_function_arguments(function, as_positional=False)
    return parser


def parse_arguments(parser, argv: list[str], types_of: dict[str, Any]):
    """The parsed and instantiated namespace; a bad flag or value is a one-line UserError."""
    from jsonargparse import ArgumentError

    try:
        return parser.instantiate_classes(parser.parse_args(argv))
    except ArgumentError as err:
        raise UserError(describe_parse_error(str(err), types_of, argv)) from None
    except ValueError as err:  # a dataclass's own checks, e.g. LitGPT's TrainArgs.__post_init__
        raise UserError(" ".join(str(err).split())) from None


def describe_parse_error(message: str, types_of: dict[str, Any], argv: list[str] = ()) -> str:
    """jsonargparse's several-line message as one line: the flag, the value, what it should be."""
    key = re.search(r'[Kk]ey "([^"]+)"', message)
    value = re.search(r"(?:Got|Given) value: (.*)", message)
    if message.startswith("Unrecognized arguments"):
        return f"{message.splitlines()[0].rstrip('.')}; see --help for the flags"
    group = re.search(r"Group '([^']+)'", message)
    flag = f"--{key.group(1)}" if key else f"--{group.group(1)}" if group else None
    given = value.group(1).strip() if value else given_value(argv, flag)
    if flag in types_of and given is not None:  # jsonargparse names no value for a bad Literal in a dataclass
        return f"{flag} {given}: expected {describe_type(types_of[flag])}"
    if key and "required" in message:
        return f"--{key.group(1)} is required; see --help"
    sections = {name.split(".")[0] for name in types_of if "." in name}
    if flag in sections and ("Unable to load config" in message or "does not accept nested key" in message):
        example = next(name for name in sorted(types_of) if name.startswith(f"{flag}."))
        return (
            f"{flag} {given_value(argv, flag)}: {flag} takes a YAML file of {flag[2:]}: settings; to set one, write"
            f" {example} VALUE (see --help)"
        )
    return " ".join(message.split())


def given_value(argv: list[str], flag: str | None) -> str | None:
    """The last value given to `flag` in argv (`--flag value` or `--flag=value`), or None."""
    found = None
    for index, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name == flag:
            found = value if sep else (argv[index + 1] if index + 1 < len(argv) else None)
    return found


def describe_type(annotation: Any) -> str:
    """An annotation as users write values: `int | None` -> 'int or null'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if annotation is type(None):
        return "null"
    return getattr(origin or annotation, "__name__", str(annotation))


def take_section_flags(argv: list[str], section: str) -> tuple[list[str], list[tuple[str, str]]]:
    """argv without its `--section[.key] value` flags, and those flags as (flag, value) in order: for settings
    that are a name or a mapping (`--optimizer AdamW --optimizer.lr 1e-3`, `--model MoE-1B --model.n_layer 6`),
    which jsonargparse would merge into stray keys."""
    rest, taken = [], []
    args = iter(argv)
    for arg in args:
        flag, sep, value = arg.partition("=")
        if flag == section or flag.startswith(section + "."):
            if not sep:
                value = next(args, None)
                if value is None:
                    raise UserError(f"{flag} needs a value")
            taken.append((flag, value))
        else:
            rest.append(arg)
    return rest, taken


# ------------------------------------------------------------------------------------------ flag types


def flag_types(function: Callable[..., Any]) -> dict[str, Any]:
    """`--name` -> type for each parameter of `function`, and `--name.field` for its dataclass parameters."""
    flags = {}
    hints = typing.get_type_hints(function)
    for name, parameter in inspect.signature(function).parameters.items():
        if dataclasses.is_dataclass(parameter.default):
            field_hints = typing.get_type_hints(type(parameter.default))
            for field in dataclasses.fields(parameter.default):
                flags[f"--{name}.{field.name}"] = field_hints[field.name]
        elif name in hints:
            flags[f"--{name}"] = hints[name]
    return flags


def allows(annotation: Any, kind: type) -> bool:
    """Whether `annotation` is `kind`, or a union of `kind` with None (`int | None`)."""
    if annotation is kind:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = set(typing.get_args(annotation)) - {type(None)}
        return members == {kind}
    return False


def integral(value: str) -> str:
    """'2e6' -> '2000000'; anything that is not an integral number in scientific notation is left alone."""
    if not re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+]?\d+", value.strip()):
        return value
    try:
        number = Decimal(value)
    except InvalidOperation:
        return value
    return str(int(number)) if number == number.to_integral_value() else value


def normalize_flags(argv: list[str], types_of: dict[str, Any]) -> list[str]:
    """A bare boolean flag means true; integer flags take integral scientific notation; an empty path is refused
    (it would mean the current directory)."""
    normalized = []
    for index, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        following = argv[index + 1] if index + 1 < len(argv) else None
        given = value if sep else following
        if allows(types_of.get(name), Path) and given is not None and not given.strip():
            raise UserError(f"{name} '': give a path")
        if allows(types_of.get(name), bool) and not sep and (following is None or following.startswith("--")):
            normalized.append(f"{name}=true")
        elif allows(types_of.get(name), int) and sep:
            normalized.append(f"{name}={integral(value)}")
        elif index > 0 and allows(types_of.get(argv[index - 1]), int):
            normalized.append(integral(arg))
        else:
            normalized.append(arg)
    return normalized


def normalize_settings(settings: dict[str, Any], types_of: dict[str, Any], prefix: str = "--") -> dict[str, Any]:
    """The same for a config file's values: `max_tokens: 2e8` (YAML reads it as a string) becomes an int."""
    normalized = {}
    for key, value in settings.items():
        flag = f"{prefix}{key}"
        if isinstance(value, dict):
            value = normalize_settings(value, types_of, prefix=f"{flag}.")
        elif allows(types_of.get(flag), int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            elif isinstance(value, str) and integral(value) != value:
                value = int(integral(value))
        normalized[key] = value
    return normalized
