"""Data at pretraining scale: the formats corpora ship in, parallel workers, resuming an interrupted preparation, a
given validation set, and existing Hugging Face tokenizers."""

import codecs
import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import zstandard
from conftest import REPO, make_documents
from test_data import read_tokens

from litmoe.core.errors import UserError
from litmoe.data.prepare import prepare
from litmoe.data.sources import resolve_source

DOCUMENTS = make_documents(count=48, sentences=12, seed=11)


def write_corpus(folder: Path, documents: list[str], field: str = "text") -> dict[str, list[str]]:
    """The documents spread over every format a corpus ships in; returns {file: its documents}."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {name: documents[index::6] for index, name in enumerate(
        ["a.parquet", "b.jsonl.gz", "c.jsonl.zst", "d.jsonl", "hf/data-00000-of-00001.arrow", "e.txt"])}  # fmt: skip
    pq.write_table(
        pa.table({field: parts["a.parquet"], "id": range(len(parts["a.parquet"]))}),
        folder / "a.parquet",
        row_group_size=3,
    )
    lines = "".join(json.dumps({field: text, "meta": 1}) + "\n" for text in parts["b.jsonl.gz"])
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    lines = "".join(json.dumps({field: text}) + "\n" for text in parts["c.jsonl.zst"])
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (folder / "d.jsonl").write_text("".join(json.dumps({field: text}) + "\n" for text in parts["d.jsonl"]))
    (folder / "hf").mkdir(exist_ok=True)  # as `datasets.Dataset.save_to_disk` writes it: Arrow streaming format
    table = pa.table({field: parts["hf/data-00000-of-00001.arrow"]})
    with pa.ipc.new_stream(folder / "hf" / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    (folder / "hf" / "dataset_info.json").write_text("{}")
    (folder / "hf" / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (folder / "e.txt").write_text(parts["e.txt"][0])
    return parts


def test_every_format_and_a_glob_are_read_in_full(tmp_path):
    parts = write_corpus(tmp_path / "corpus", DOCUMENTS, field="content")
    source = resolve_source(str(tmp_path / "corpus"), tmp_path, text_field="content")
    expected = [text for name, texts in parts.items() for text in (texts if name != "e.txt" else texts[:1])]
    assert sorted(source.documents()) == sorted(expected)
    by_glob = resolve_source(str(tmp_path / "corpus" / "*.jsonl*"), tmp_path, text_field="content")
    assert sorted(by_glob.documents()) == sorted(parts["b.jsonl.gz"] + parts["c.jsonl.zst"] + parts["d.jsonl"])


def test_links_back_up_are_walked_once_and_said(tmp_path, capsys):
    corpus = tmp_path / "src"
    (corpus / "deep").mkdir(parents=True)
    for index, document in enumerate(DOCUMENTS[:12]):
        (corpus / ("deep" if index % 2 else ".") / f"doc{index:02d}.txt").write_text(document)
    (corpus / "a").symlink_to(".")  # two loops: a glob with ** or a walk following links would never end
    (corpus / "deep" / "b").symlink_to("..")
    (corpus / "again.txt").symlink_to(corpus / "doc00.txt")  # a second name for a file already read
    for source in (str(corpus / "**" / "*.txt"), str(corpus)):
        assert sorted(resolve_source(source, tmp_path).documents()) == sorted(DOCUMENTS[:12])
        assert "skipped 3 links to folders or files already read" in capsys.readouterr().out


def test_a_folder_named_like_a_glob_is_that_folder(tmp_path):
    for name, documents in (("corpus[1]", DOCUMENTS[:3]), ("corpus1", DOCUMENTS[3:9])):
        (tmp_path / name).mkdir()
        for index, document in enumerate(documents):
            (tmp_path / name / f"{index}.txt").write_text(document)
    assert sorted(resolve_source(str(tmp_path / "corpus[1]"), tmp_path).documents()) == sorted(DOCUMENTS[:3])
    as_pattern = resolve_source(str(tmp_path / "corpus[0-9]" / "*.txt"), tmp_path)  # no such folder: a pattern
    assert sorted(as_pattern.documents()) == sorted(DOCUMENTS[3:9])


def test_globs_match_as_python_globs_do_on_a_tree_without_links(tmp_path):
    import glob

    from litmoe.data.files import data_kind, glob_files

    for name in ("a/x.txt", "a/b/y.jsonl", "a/b/c/z.txt", "top.txt", "a/b/w.parquet.bak", "q/r.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    for pattern in ("**/*.txt", "a/**/*.txt", "a/*/*", "?/*.txt", "[aq]/**", "a/[b]", "[!a]/*"):
        expected = set()
        for match in glob.glob(str(tmp_path / pattern), recursive=True):
            found = [Path(match)] if Path(match).is_file() else [p for p in Path(match).rglob("*") if p.is_file()]
            expected |= {path for path in found if data_kind(path)}
        assert set(glob_files(str(tmp_path / pattern))) == expected, pattern


def test_workers_write_the_same_data_as_one_process_and_hash_each_chunk_as_written(tmp_path, monkeypatch):
    """In this process or in two workers, the same tokens; and SHA256SUMS lists every chunk with the digest its
    writer took, none read back from disk."""
    import hashlib

    from litmoe.core import checksums

    read_back = checksums.file_digest

    def small_files_only(path: Path) -> str:
        assert not Path(path).name.startswith("chunk-"), f"{path} was read again to hash it"
        return read_back(path)

    monkeypatch.setattr(checksums, "file_digest", small_files_only)
    write_corpus(tmp_path / "corpus", DOCUMENTS)
    one = prepare(str(tmp_path / "corpus"), tmp_path / "one", vocab_size=300, val_fraction=0.2, workers=1)
    two = prepare(str(tmp_path / "corpus"), tmp_path / "two", vocab_size=300, val_fraction=0.2, workers=2)
    assert one.documents == two.documents and one.tokens == two.tokens
    assert sum(one.documents.values()) == 8 * 5 + 1
    for split in ("train", "val"):
        assert read_tokens(tmp_path / "one" / split).tolist() == read_tokens(tmp_path / "two" / split).tolist()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["corpus", "one", "two"]
    for folder in (tmp_path / "one", tmp_path / "two"):
        listed = dict(line.split("  ")[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
        files = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}
        assert any(name.startswith("train/chunk-") for name in listed)
        assert listed == {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()
                          if name != "SHA256SUMS"}  # fmt: skip


def test_preparing_data_never_imports_litgpt(tmp_path):
    """prepare_data.py and its workers run without LitGPT's 12 s import (BOS/EOS are read as LitGPT reads them:
    tests/test_data.py)."""
    write_corpus(tmp_path / "corpus", DOCUMENTS)
    code = (
        "import runpy, sys; sys.argv = ['prepare_data.py', *sys.argv[1:]]; runpy.run_path('prepare_data.py',"
        " run_name='__main__'); print(sorted(name for name in sys.modules if name.split('.')[0] == 'litgpt'))"
    )
    command = [sys.executable, "-c", code, "--source", str(tmp_path / "corpus"), "--out_dir", str(tmp_path / "out"),
               "--vocab_size", "300", "--val_fraction", "0.2", "--workers", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert result.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_an_interrupted_preparation_resumes_with_its_finished_shards(tmp_path, monkeypatch):
    import litmoe.data.shards

    write_corpus(tmp_path / "corpus", DOCUMENTS)
    done = []
    real = litmoe.data.shards.process_shard

    def dies_after_three(job):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(job.shard.name)
        return real(job)

    monkeypatch.setattr(litmoe.data.shards, "process_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "corpus"), tmp_path / "out", vocab_size=300, val_fraction=0.2, workers=1)
    assert len(list((tmp_path / ".out.partial" / "shards").glob("*/done.json"))) == 3

    redone = []
    monkeypatch.setattr(litmoe.data.shards, "process_shard", lambda job: redone.append(job.shard.name) or real(job))
    resumed = prepare(str(tmp_path / "corpus"), tmp_path / "out", vocab_size=300, val_fraction=0.2, workers=1)
    clean = prepare(str(tmp_path / "corpus"), tmp_path / "clean", vocab_size=300, val_fraction=0.2, workers=1)
    assert resumed.tokens == clean.tokens
    for split in ("train", "val"):
        assert read_tokens(tmp_path / "out" / split).tolist() == read_tokens(tmp_path / "clean" / split).tolist()
    # the finished shards were handed out again but found done: only the rest were tokenized
    assert not (tmp_path / ".out.partial").exists()


def test_a_given_validation_set_is_kept_as_it_is(tmp_path, capsys):
    """As given, and checked for exact copies of training documents (said, not refused: a user may want them)."""
    train, val = make_documents(30, 10, seed=1), make_documents(6, 10, seed=2)
    write_corpus(tmp_path / "train", train)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in val))
    manifest = prepare(
        str(tmp_path / "train"), tmp_path / "out", vocab_size=300, val_source=str(tmp_path / "val.jsonl"), workers=1
    )
    assert manifest.documents == {"train": 26, "val": 6} and manifest.val_source.endswith("val.jsonl")
    assert "exact copies" not in capsys.readouterr().out

    layout = tmp_path / "custom_text"  # the MoE-200M recipe's custom_text/train|val layout
    for split, texts in (("train", train), ("val", [*val, *train[:2]])):
        (layout / split).mkdir(parents=True)
        for index, text in enumerate(texts):
            (layout / split / f"{index}.txt").write_text(text)
    by_folders = prepare(str(layout), tmp_path / "out2", vocab_size=300, workers=1)
    assert by_folders.documents == {"train": 30, "val": 8}
    assert "Note: 2 of the 8 given validation documents are exact copies of training" in capsys.readouterr().out


def test_a_gpt2_format_tokenizer_is_used_as_it_is(tmp_path, train_args):
    """A Hugging Face tokenizer directory whose BOS and EOS are one token, GPT-2's <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from litmoe.training.cli import main

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(DOCUMENTS, trainer=trainer)
    tokenizer.save(str(gpt2 / "tokenizer.json"))
    (gpt2 / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))  # fmt: skip
    write_corpus(tmp_path / "corpus", DOCUMENTS)
    manifest = prepare(str(tmp_path / "corpus"), tmp_path / "data", tokenizer_dir=gpt2, val_fraction=0.2, workers=1)
    tokens = read_tokens(tmp_path / "data" / "train")
    assert tokens[0] == tokens[-1] == tokenizer.token_to_id("<|endoftext|>")  # BOS ... EOS, one token
    assert (tmp_path / "data" / "tokenizer" / "tokenizer.json").read_bytes() == (gpt2 / "tokenizer.json").read_bytes()
    assert manifest.tokens["train"] == len(tokens)
    args = train_args(tmp_path / "run", 256 * 2)
    args[args.index("--data_dir") + 1] = str(tmp_path / "data")
    main(args)
    config = yaml.safe_load((tmp_path / "run" / "final" / "model_config.yaml").read_text())
    assert config["vocab_size"] == tokenizer.get_vocab_size()  # the model's vocabulary follows the tokenizer


def damaged_gzip(fraction: float) -> bytes:
    """A .jsonl.gz with one byte flipped: early, the deflate stream breaks; later, it decompresses to garbage that
    only the checksum at the end exposes (the JSON parser meets the garbage first)."""
    lines = "".join(json.dumps({"text": document}) + "\n" for document in DOCUMENTS * 20).encode()
    data = bytearray(gzip.compress(lines, mtime=0))
    data[int(len(data) * fraction)] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "a.parquet"), "a.parquet: no 'text' column (it has"),
        (lambda d: (d / "a.jsonl.zst").write_bytes(b"not zstd at all"), "a.jsonl.zst: a corrupt compressed file"),
        (lambda d: (d / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": 5}\n')),
         "a.jsonl.gz:2: 'text' is a JSON number, not text"),
        (lambda d: (d / "a.jsonl").write_text('[{"text": "ok"}]\n'), "a.jsonl:1: a JSON array, not an object"),
        (lambda d: (d / "a.jsonl").write_text('{"text": "a", "text": "b"}\n'),
         "a.jsonl:1: the key 'text' appears twice in one object; keep one"),
        (lambda d: (d / "a.txt").write_bytes(b"text" + bytes(1000)), "a.txt: holds NUL bytes, so it is binary data"),
        (lambda d: (d / "a.jsonl.gz").write_bytes(damaged_gzip(0.02)), "a.jsonl.gz: a corrupt compressed file (Error"),
        (lambda d: (d / "a.jsonl.gz").write_bytes(damaged_gzip(0.62)), "a.jsonl.gz: a corrupt compressed file (Compr"),
        (lambda d: pq.write_table(pa.table({"text": [1, 2]}), d / "a.parquet"), "a.parquet, row 1: 'text' is int"),
    ],
)  # fmt: skip
def test_bad_records_in_any_format_are_one_line(tmp_path, make, message):
    (tmp_path / "src").mkdir()
    make(tmp_path / "src")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        prepare(str(tmp_path / "src"), tmp_path / "out", vocab_size=300)
    assert "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]  # nothing left behind


def test_byte_order_marks_json_arrays_and_empty_documents(tmp_path, capsys):
    """A UTF-8 byte-order mark (as Notepad and PowerShell write) is not part of the text; a .json file may hold one
    array of records; empty documents are skipped and counted, not dropped without a word."""
    folder = tmp_path / "src"
    folder.mkdir()
    records = "".join(json.dumps({"text": text}) + "\n" for text in [*DOCUMENTS[:40], ""])
    (folder / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + records.encode())
    (folder / "bom.txt").write_bytes(codecs.BOM_UTF8 + DOCUMENTS[40].encode())
    (folder / "blank.txt").write_text(" \n")
    assert sorted(resolve_source(str(folder), tmp_path).documents()) == sorted([*DOCUMENTS[:41], "", " \n"])
    manifest = prepare(str(folder), tmp_path / "out", vocab_size=300, val_fraction=0.2, workers=1)
    assert sum(manifest.documents.values()) == 41
    assert "Skipped 2 empty documents (blank files or records, empty text)" in capsys.readouterr().out

    array = tmp_path / "records.json"
    array.write_bytes(codecs.BOM_UTF8 + json.dumps([{"text": text} for text in DOCUMENTS[:5]], indent=2).encode())
    assert list(resolve_source(str(array), tmp_path).documents()) == DOCUMENTS[:5]


def test_a_vocabulary_larger_than_the_text_supports_is_said(tmp_path, capsys):
    from tokenizers import Tokenizer

    from litmoe.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(DOCUMENTS, 100_000, tmp_path / "tokenizer")
    learned = Tokenizer.from_file(str(tmp_path / "tokenizer" / "tokenizer.json")).get_vocab_size()
    assert learned < 100_000
    assert f"The tokenizer has {learned:,} tokens, not --vocab_size 100,000" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- training reads


def windows(loader) -> list[list[int]]:
    return [row.tolist() for batch in loader for row in batch]


def test_batches_across_chunk_boundaries_hold_the_right_tokens(tmp_path):
    """Many small shards make many small chunks: batches that span them must still hold the windows' own tokens."""
    from litmoe.data.training_data import DataSource, PreparedData

    write_corpus(tmp_path / "corpus", DOCUMENTS)
    prepare(str(tmp_path / "corpus"), tmp_path / "data", vocab_size=300, val_fraction=0.3, workers=1)
    data = PreparedData([DataSource(tmp_path / "data")], num_workers=0)
    data.connect(batch_size=1, max_seq_length=64)
    one_at_a_time = windows(data.val_dataloader())
    data.connect(batch_size=4, max_seq_length=64)
    batched = windows(data.val_dataloader())
    assert len(json.loads((tmp_path / "data" / "val" / "index.json").read_text())["chunks"]) > 2
    assert batched == one_at_a_time[: len(batched)] and len(batched) >= 4
    assert max(max(window) for window in batched) < 300


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two prepared corpora with disjoint words and one tokenizer: which source a window came from is visible."""
    root = tmp_path_factory.mktemp("mixture")
    for name, word in (("a", "apple"), ("b", "zebra")):
        (root / name).mkdir()
        for index in range(40):
            rng = random.Random(index)
            (root / name / f"{index}.txt").write_text(" ".join(f"{word}{rng.randrange(7)}" for _ in range(200)))
    prepare(str(root / "a"), root / "data-a", vocab_size=300, val_fraction=0.2, workers=1)
    prepare(str(root / "b"), root / "data-b", tokenizer_dir=root / "data-a" / "tokenizer", val_fraction=0.2, workers=1)
    return root


def test_a_mixture_samples_each_source_by_its_weight(two_sources):
    from litmoe.data.tokenizer import load_tokenizer
    from litmoe.data.training_data import PreparedData, data_sources

    tokenizer = load_tokenizer(two_sources / "data-a" / "tokenizer")
    data = PreparedData(data_sources(f"{two_sources / 'data-a'}:0.7,{two_sources / 'data-b'}:0.3"), num_workers=0)
    data.connect(batch_size=8, max_seq_length=15)
    drawn = [tokenizer.decode(torch.tensor(window)) for window in windows(data.train_dataloader())[:800]]
    assert len(drawn) == 800 and all(("apple" in text) != ("zebra" in text) for text in drawn)  # one source each
    assert sum("apple" in text for text in drawn) / len(drawn) == pytest.approx(0.7, abs=0.05)


def test_a_mixture_trains_and_resumes_each_source_where_it_stopped(two_sources, train_args, tmp_path):
    from test_train import logged

    from litmoe.training.cli import main

    mixture = f"{two_sources / 'data-a'}:0.7,{two_sources / 'data-b'}:0.3"

    def args(out_dir, *extra):
        arguments = train_args(
            out_dir, 256 * 12, extra=("--train.save_interval", "4", "--eval.interval", "100", *extra)
        )
        arguments[arguments.index("--data_dir") + 1] = mixture
        return arguments

    main(args(tmp_path / "full"))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "step-00000004", resumed / "step-00000004")
    main(args(resumed, "--resume", "auto"))
    expected, got = logged(tmp_path / "full", "loss"), logged(resumed, "loss")
    assert sorted(got) == list(range(4, 12))
    assert all(got[step] == pytest.approx(expected[step], rel=1e-5) for step in got)


def test_a_mixture_of_two_tokenizers_is_refused(two_sources, prepared, train_args, tmp_path):
    from litmoe.training.cli import main

    arguments = train_args(tmp_path / "out")
    arguments[arguments.index("--data_dir") + 1] = f"{two_sources / 'data-a'}:0.5,{prepared}:0.5"
    with pytest.raises(UserError, match=r"was prepared with another tokenizer than .*data-a; prepare it again"):
        main(arguments)


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (Linux /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in stat_state(pid)}


def stat_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_stopping_a_preparation_leaves_no_worker_running(how, tmp_path, prepared):
    """SIGTERM or SIGINT mid-work: the pool stops, finished shards are kept, one line (no warning about what the
    stopped workers held), exit 75, and the same command continues. kill -9 of the parent: its workers die with it
    (nothing goes on writing into the partial build)."""
    import signal
    import time

    from litmoe.data.shards import SHARD_DONE

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(24):
        lines = "".join(json.dumps({"text": document * 4}) + "\n" for document in make_documents(200, 12, seed=index))
        (corpus / f"part{index:02d}.jsonl").write_text(lines)
    command = [sys.executable, str(REPO / "prepare_data.py"), "--source", str(corpus), "--out_dir",
               str(tmp_path / "out"), "--tokenizer_dir", str(prepared / "tokenizer"), "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, workers = time.monotonic() + 120, set()
    while len(workers) < 2 and time.monotonic() < deadline and process.poll() is None:
        workers = {
            pid for pid in children_of(process.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        }
        time.sleep(0.2)
    assert len(workers) == 2, "the workers did not start"
    while not list(tmp_path.glob(f".out.partial/shards/*/{SHARD_DONE}")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the workers are busy: a shard is done, the next ones are under way
    process.send_signal(getattr(signal, how))
    _, err = process.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(workers)
    if how != "SIGKILL":
        lines = err.strip().splitlines()
        assert process.returncode == 75 and len(lines) == 1, err[-2000:]
        assert lines[0].startswith(f"Stopped by {how}:") and "run the same command again to continue" in lines[0]
        rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "Resuming the preparation in" in rerun.stdout and (tmp_path / "out" / "manifest.json").is_file()


def test_chat_parquet_of_message_structs_and_a_cut_off_zst(tmp_path):
    chats = [[{"role": "user", "content": f"question {index}"}, {"role": "assistant", "content": "answer"}]
             for index in range(5)]  # fmt: skip
    pq.write_table(pa.table({"messages": chats}), tmp_path / "chat.parquet")  # a list of {role, content} structs
    documents = list(resolve_source(str(tmp_path / "chat.parquet"), tmp_path).documents())
    assert documents[0] == "<|user|>\nquestion 0\n<|assistant|>\nanswer\n" and len(documents) == 5
    lines = "".join(json.dumps({"text": document}) + "\n" for document in DOCUMENTS).encode()
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(lines)
    (tmp_path / "cut.jsonl.zst").write_bytes(frame[: len(frame) // 2])  # an interrupted download
    with pytest.raises(
        UserError, match=r"cut.jsonl.zst: a corrupt compressed file \(the file ends inside a zstd frame"
    ):
        list(resolve_source(str(tmp_path / "cut.jsonl.zst"), tmp_path).documents())


def test_a_data_dir_whose_name_holds_a_colon_is_that_directory(tmp_path):
    from litmoe.data.training_data import DataSource, data_sources

    (tmp_path / "run:2").mkdir()
    assert data_sources(str(tmp_path / "run:2")) == [DataSource(tmp_path / "run:2", 1.0)]
    assert data_sources(f"{tmp_path / 'a'}:3,{tmp_path / 'b'}") == [DataSource(tmp_path / "a", 3.0),
                                                                     DataSource(tmp_path / "b", 1.0)]  # fmt: skip
    with pytest.raises(UserError, match="True is not a weight"):  # YAML's `weight: true` is no number
        data_sources([{"path": str(tmp_path / "a"), "weight": True}, str(tmp_path / "b")])


def test_prepared_data_lists_its_checksums_and_verify_finds_a_changed_chunk(prepared, tmp_path, capsys):
    """prepare_data.py writes SHA256SUMS (sha256sum's format) over everything it made; `--verify` reads it back."""
    import hashlib

    from litmoe.core.errors import EXIT_CORRUPT, RunStopped
    from litmoe.data.training_data import training_data

    listed = dict(line.split("  ")[::-1] for line in (prepared / "SHA256SUMS").read_text().splitlines())
    files = {path.relative_to(prepared).as_posix(): path for path in prepared.rglob("*") if path.is_file()}
    assert listed == {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()
                      if name != "SHA256SUMS"}  # fmt: skip
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    capsys.readouterr()
    assert prepare(out_dir=copy, verify=True) is None
    assert capsys.readouterr().out == f"ok      {copy}: {len(listed)} files match SHA256SUMS\n"
    chunk = sorted((copy / "train").glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(data)
    with pytest.raises(RunStopped) as failed:
        prepare(out_dir=copy, verify=True)
    assert failed.value.exit_code == EXIT_CORRUPT
    assert f"train/{chunk.name} does not match its checksum in SHA256SUMS" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"train/{chunk.name} does not match its checksum .*; prepare it again"):
        training_data(str(copy), 4, 64, copy)  # what a run checks before it starts (its tokens changed silently)
