"""The docs cannot drift from the code: every command line that README.md and docs/*.md quote uses only flags its
script has, every flag table names real flags, and every link between the pages lands.

`--help`-level and in-process: each script's flags come from the same parser and tables the script itself uses
(`litmoe.core.cli.function_parser` of the function it names; for run_train.py also the short flags of
`litmoe.training.cli` and the free-form `--model.FIELD` and `--optimizer.NAME`). Nothing trains, prepares data or
loads a checkpoint.
"""

import dataclasses
import fnmatch
import functools
import importlib
import inspect
import re
import shlex
from pathlib import Path

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = ("run_train.py", "prepare_data.py", "generate.py", "evaluate.py", "export_hf.py")
# The multi-node launchers pass the arguments after them on to run_train.py.
LAUNCHERS = {
    "scripts/slurm_train.sbatch": "run_train.py",
    "scripts/torchrun_multinode.sh": "run_train.py",
    "scripts/deepspeed_launch.sh": "run_train.py",
}
FLAG_TABLE = re.compile(r"<!--\s*flags:\s*(\S+)\s*-->")  # marks the flag table that follows as one script's
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", "<", ">", ">>", "(", ")"}  # shlex's punctuation_chars


@dataclasses.dataclass
class Snippet:
    doc: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


# ------------------------------------------------------------------------------------------- what the docs quote


def code_snippets(doc: Path) -> list[Snippet]:
    """Every line of a fenced code block (continued lines joined) and every inline code span, with its line."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    snippets, prose, fenced, pending = [], [], False, None
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
            continue
        if not fenced:
            prose.append(line)
            continue
        prose.append("")  # keep the line numbers of the prose
        if pending is not None:
            pending.text += " " + line.strip()
        else:
            pending = Snippet(doc, number, line.strip())
        if pending.text.endswith("\\"):
            pending.text = pending.text[:-1].rstrip()
        else:
            snippets.append(pending)
            pending = None
    text = "\n".join(prose)
    for span in re.finditer(r"`([^`]+)`", text):
        if "\n\n" not in span.group(1):  # a span never crosses a paragraph
            line = text.count("\n", 0, span.start()) + 1
            snippets.append(Snippet(doc, line, " ".join(span.group(1).replace("\\|", "|").split())))
    return snippets


def words(text: str) -> list[str]:
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        return list(lexer)
    except ValueError:  # prose in backticks (an apostrophe): plain words are enough to find flags
        return text.split()


def script_of(word: str) -> str | None:
    if word in LAUNCHERS:
        return LAUNCHERS[word]
    name = word.rsplit("/", 1)[-1]
    return name if name in SCRIPTS and word in (name, f"./{name}") else None


def command_lines(snippet: Snippet) -> list[tuple[str, list[str]]]:
    """(script, its words after the script's name) for each command of the snippet that invokes one of ours."""
    commands, segment = [], []
    for word in [*words(snippet.text), ";"]:
        if word not in SHELL_OPERATORS:
            segment.append(word)
            continue
        for index, token in enumerate(segment):
            script = script_of(token)
            if script is None:
                continue
            # a command: run by an interpreter or given flags; a bare `run_train.py` in prose is only its name
            invoked = index > 0 and segment[index - 1] in ("python", "python3", "bash", "sbatch", "srun")
            if invoked or any(arg.startswith("--") for arg in segment[index + 1 :]):
                commands.append((script, segment[index + 1 :]))
            break
        segment = []
    return commands


def with_next(args: list[str]) -> list[tuple[str, str]]:
    """Each word with the one after it ("" after the last)."""
    return [(arg, args[index + 1] if index + 1 < len(args) else "") for index, arg in enumerate(args)]


def flags_in(args: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in args if arg.startswith("--") and arg != "--"]


def all_command_lines() -> list[tuple[Snippet, str, list[str]]]:
    return [
        (snippet, script, args)
        for doc in DOCS
        for snippet in code_snippets(doc)
        for script, args in command_lines(snippet)
    ]


def flag_tables(doc: Path) -> list[tuple[str, int, list[str]]]:
    """(script, line, the flags in the row's code spans that start with one) for each row of a table marked
    `<!-- flags: SCRIPT -->`."""
    rows, script, started = [], None, False
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        if marker := FLAG_TABLE.search(line):
            script, started = marker.group(1), False
        elif script and line.startswith("|"):
            started = True
            if not re.fullmatch(r"[|\s:-]+", line) and not line.startswith("| flag "):
                spans = [span.replace("\\|", "|").split() for span in re.findall(r"`([^`]+)`", line)]
                flags = [word for span in spans if span[0][:2] == "--" for word in span if word[:2] == "--"]
                rows.append((script, number, flags))  # spans of flags; another program's (`litgpt ...`) are not
        elif script and started:
            script = None
    return rows


# ------------------------------------------------------------------------------------------ what the scripts take


def target_of(script: str) -> tuple[str, bool]:
    """The "module:function" a script hands to run_command, and whether that function parses its own flags."""
    source = (REPO / script).read_text(encoding="utf-8")
    found = re.search(r'run_command\("([\w.]+:\w+)"(, parses_its_flags=True)?\)', source)
    assert found, f"{script}: no run_command(...) call; teach tests/test_docs.py how this script reads its flags"
    return found.group(1), bool(found.group(2))


def function_of(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def parser_flags(function) -> set[str]:
    from litmoe.core.cli import function_parser

    return {flag for flag in function_parser(function)._option_string_actions if flag.startswith("--")}


@functools.cache
def known_flags(script: str) -> frozenset[str]:
    target, parses_its_flags = target_of(script)
    if not parses_its_flags:
        return frozenset(parser_flags(function_of(target)))
    assert target == "litmoe.training.cli:main", f"{script}: {target} parses its own flags; teach tests/test_docs.py"
    from litgpt import Config

    from litmoe.training import cli

    flags = parser_flags(cli.setup)  # the parser build_parser makes
    flags |= set(cli.SWITCHES) | set(cli.RENAMED) | {mode.split()[0] for mode in cli.MODES}
    flags |= {f"--model.{field.name}" for field in dataclasses.fields(Config)}  # take_section_flags: any field
    return frozenset(flags)


def optimizer_parameters(args: list[str]) -> set[str]:
    """The parameters of the optimizer the command names (`--optimizer SGD`, `--optimizer.class_path X`), else the
    train config's AdamW: what `--optimizer.NAME` and `--optimizer.init_args.NAME` may set."""
    from litmoe.training.settings import full_class_path

    class_path = "torch.optim.AdamW"
    for flag, value in with_next(args):
        if flag in ("--optimizer", "--optimizer.class_path") and re.fullmatch(r"[\w.]+", value):
            class_path = full_class_path(value)
    module, _, name = class_path.rpartition(".")
    optimizer = getattr(importlib.import_module(module), name)
    return set(inspect.signature(optimizer).parameters) - {"params"}


def flag_exists(script: str, flag: str, args: list[str]) -> bool:
    known = known_flags(script)
    if flag in known:
        return True
    if script == "run_train.py" and flag.startswith("--optimizer."):  # take_section_flags: class_path or a parameter
        key = flag.removeprefix("--optimizer.").removeprefix("init_args.")
        return key == "class_path" or key in optimizer_parameters(args) or bool(re.fullmatch(r"\*|[A-Z]+", key))
    # a placeholder the docs use in a flag's name: `--train.*`, `--offload-*`, `--model.FIELD`
    pattern = ".".join("*" if re.fullmatch(r"[A-Z]+", part) else part for part in flag.split("."))
    return "*" in pattern and any(fnmatch.fnmatchcase(name, pattern) for name in known)


# ------------------------------------------------------------------------------------------------------- the tests


def test_every_command_line_in_the_docs_uses_flags_its_script_has():
    commands = all_command_lines()
    wrong = [
        f"{snippet.where()}: {script} has no flag {flag} (in `{snippet.text}`)"
        for snippet, script, args in commands
        for flag in flags_in(args)
        if not flag_exists(script, flag, args)
    ]
    assert not wrong, "\n".join(wrong)
    # not vacuous: the docs quote many command lines, and every script at least once
    assert len(commands) >= 30, f"found only {len(commands)} command lines in {[d.name for d in DOCS]}"
    assert {script for _, script, _ in commands} == set(SCRIPTS)
    assert sum(len(flags_in(args)) for _, _, args in commands) >= 60


def test_every_flag_table_names_flags_its_script_has():
    rows = [(doc, *row) for doc in DOCS for row in flag_tables(doc)]
    wrong = [
        f"{doc.relative_to(REPO)}:{line}: {script} has no flag {flag}"
        for doc, script, line, flags in rows
        for flag in flags
        if not flag_exists(script, flag, [])
    ]
    assert not wrong, "\n".join(wrong)
    assert {script for _, script, _, _ in rows} >= {"run_train.py", "prepare_data.py"}
    assert sum(len(flags) for *_, flags in rows) >= 50


def test_the_checker_catches_a_flag_that_does_not_exist():
    snippet = Snippet(REPO / "README.md", 1, "uv run python run_train.py --resume auto --no-such-flag 3 \\")
    (script, args), *_ = command_lines(snippet)
    assert script == "run_train.py" and flags_in(args) == ["--resume", "--no-such-flag"]
    assert flag_exists(script, "--resume", args) and not flag_exists(script, "--no-such-flag", args)
    assert flag_exists(script, "--model.n_expert", args) and not flag_exists(script, "--model.n_experts", args)
    assert flag_exists(script, "--optimizer.lr", args) and not flag_exists(script, "--optimizer.learning_rate", [])
    assert flag_exists(script, "--optimizer.momentum", ["--optimizer", "SGD"])
    assert not flag_exists("generate.py", "--checkpoints", []) and flag_exists("evaluate.py", "--checkpoints", [])
    piped = Snippet(REPO / "README.md", 1, 'echo "x" | uv run python generate.py --prompt - > out.txt')
    assert command_lines(piped) == [("generate.py", ["--prompt", "-"])]


def test_links_between_the_pages_land():
    anchors = {doc: heading_anchors(doc) for doc in DOCS}
    wrong = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
            if not linked.exists():
                wrong.append(f"{where}: {target}: no such file")
            elif anchor and linked.suffix == ".md":
                if linked not in anchors:  # another markdown file, e.g. benchmarks/README.md
                    anchors[linked] = heading_anchors(linked)
                if anchor not in anchors[linked]:
                    wrong.append(f"{where}: {target}: no such heading")
    assert not wrong, "\n".join(wrong)


def heading_anchors(doc: Path) -> set[str]:
    """GitHub's anchors: the heading lowercased, without punctuation, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [doc.name for doc in DOCS[1:] if f"](docs/{doc.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_describes_the_cpu_run_as_train_config_yaml_sets_it():
    """What the README says the default CPU run prints and writes, and the checkpoints its examples use, are what
    train_config.yaml's cpu profile makes."""
    from litmoe.training.cli import CPU_PROFILE, PROFILES, describe_profile, load_train_config

    config = load_train_config(REPO / "train_config.yaml")
    cpu = config[PROFILES][CPU_PROFILE]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"No CUDA GPU: using the CPU profile of the train config ({describe_profile(cpu)})." in readme
    train = {**config["train"], **cpu["train"]}
    steps = int(float(train["max_tokens"])) // (train["micro_batch_size"] * train["max_seq_length"])
    steps //= train["global_batch_size"] // train["micro_batch_size"]
    saved = {f"step-{step:08d}" for step in range(train["save_interval"], steps + 1, train["save_interval"])}
    saved.add("final")
    used = []
    for snippet, script, args in all_command_lines():
        if snippet.doc.name == "README.md" and script != "run_train.py":
            for flag, value in with_next(args):
                if flag in ("--checkpoint", "--checkpoints"):
                    used += [(snippet.where(), path) for path in value.strip("[]").split(",")]
    assert used
    for where, path in used:
        assert path.startswith(cpu["out_dir"] + "/") or path == cpu["out_dir"], (where, path)
        assert path == cpu["out_dir"] or path.rsplit("/", 1)[1] in saved, (where, path, sorted(saved))


def test_the_preset_tables_of_the_readme_and_the_training_page_agree():
    """test_presets.py checks the README's parameter counts against built models; the full table must say the same."""
    pattern = r"^\| (MoE-[\w-]+) \| ([^|]+) \| ([^|]+) \|(?:[^|]*\|)*? ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|"

    def rows(doc: Path) -> set[tuple[str, ...]]:
        return {tuple(cell.strip() for cell in row) for row in re.findall(pattern, doc.read_text(), re.M)}

    readme, training = rows(REPO / "README.md"), rows(REPO / "docs" / "training.md")
    assert len(readme) == 6 and readme == training
