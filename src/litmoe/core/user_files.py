"""The one guarded way to read a file the user gave: its OS and decoding errors, and its YAML or JSON errors,
become one `UserError` naming the file, where it is wrong and what to do.

YAML is read as users write it elsewhere: `3e-4` and `2e6` are numbers (PyYAML's YAML 1.1 wants `3.0e-4`), and a
key given twice in one mapping is refused rather than silently keeping the last (YAML's own rule, which PyYAML
does not enforce). Only plain data loads: a `!!python/...` tag is an error, never code.
"""

import json
import re
from pathlib import Path
from typing import Any

import yaml

from litmoe.core.errors import UserError


class UserYamlLoader(yaml.SafeLoader):
    """Safe YAML with scientific-notation floats, refusing a key given twice (merge keys, `<<: *anchor`, work as
    YAML defines them: the mapping's own keys win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


UserYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def read_yaml(text: str) -> Any:
    """A YAML (or JSON) document or value; raises yaml.YAMLError."""
    return yaml.load(text, Loader=UserYamlLoader)


def read_flag_value(flag: str, text: str) -> Any:
    """A command-line value read as YAML (`--model.n_layer 6`, `--optimizer.betas [0.9,0.95]`); one line if not."""
    try:
        return read_yaml(text)
    except yaml.YAMLError as err:
        raise UserError(f"{flag} {text}: not a valid value{yaml_problem(err)}; check its brackets and quotes") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """'at line N (what is wrong)' for a parse error, in one line."""
    mark = getattr(err, "problem_mark", None)
    line = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return f"{line} ({' '.join(str(problem).split())})"


def read_text(path: Path, what: str, flag: str | None = None) -> str:
    """A text file's contents; a missing, unreadable or non-UTF-8 file is one line naming it (after `flag`)."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file; give the path of {what}") from None
    except IsADirectoryError:
        raise UserError(f"{where}: a directory; give the path of {what}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not UTF-8 text (byte {err.start}); save {what} as UTF-8") from None
    except OSError as err:
        raise UserError(f"{where}: cannot read it ({err.strerror}); check its permissions") from None


def read_yaml_file(path: Path, what: str, fix: str, flag: str | None = None) -> Any:
    """The parsed contents of a YAML file the user gave (`what` it should be); errors name the file (after `flag`),
    the line, what is wrong, and `fix`."""
    text = read_text(path, what, flag)
    try:
        return read_yaml(text)
    except yaml.YAMLError as err:
        where = f"{flag} {path}" if flag else str(path)
        raise UserError(f"{where}: not valid YAML{yaml_problem(err)}; {fix}") from None


def read_json_file(path: Path, what: str, fix: str, flag: str | None = None) -> Any:
    """The parsed contents of a JSON file the user gave; errors name the file (after `flag`), the line, and `fix`."""
    text = read_text(path, what, flag)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{flag} {path}" if flag else str(path)
        raise UserError(f"{where}: not valid JSON at line {err.lineno} ({err.msg}); {fix}") from None
