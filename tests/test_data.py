import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import make_documents
from litdata.streaming import StreamingDataset, TokensLoader

from litmoe.core.errors import UserError
from litmoe.data.prepare import prepare
from litmoe.data.prepared import MANIFEST
from litmoe.data.readers import read_jsonl, render_chat
from litmoe.data.shards import Encoder, TokenizerSpec, encode_documents, pieces, split_documents
from litmoe.data.sources import python_docs_source, tinystories_source
from litmoe.data.tokenizer import BOS_TOKEN, EOS_TOKEN, document_markers, load_tokenizer


def read_tokens(split_dir: Path) -> torch.Tensor:
    dataset = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1), shuffle=False)
    return torch.cat([dataset[i] for i in range(len(dataset))])


def test_folder_source_prepares_litgpt_data(prepared, text_folder):
    from litgpt import Tokenizer

    manifest = json.loads((prepared / MANIFEST).read_text())
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == 60
    assert manifest["documents"]["val"] > 0
    tokenizer = Tokenizer(prepared / "tokenizer")
    assert tokenizer.token_to_id(BOS_TOKEN) == tokenizer.bos_id
    assert tokenizer.token_to_id(EOS_TOKEN) == tokenizer.eos_id
    for split in ("train", "val"):
        tokens = read_tokens(prepared / split)
        assert len(tokens) == manifest["tokens"][split]
        # every document is framed BOS ... EOS
        assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
        assert (tokens == tokenizer.bos_id).sum() == manifest["documents"][split]
        assert (tokens == tokenizer.eos_id).sum() == manifest["documents"][split]
    # the first training document round-trips through the tokenizer
    train_tokens = read_tokens(prepared / "train")
    first_doc = train_tokens[1 : int((train_tokens == tokenizer.eos_id).nonzero()[0])]
    assert tokenizer.decode(first_doc) in {p.read_text() for p in text_folder.glob("*.txt")}


def test_split_is_deterministic_and_by_content():
    documents = make_documents(count=200, sentences=3, seed=1)
    first = list(split_documents(documents, val_fraction=0.1))
    again = list(split_documents(reversed(documents), val_fraction=0.1))
    assert sorted(first) == sorted(again)
    val = sum(split == "val" for split, _ in first)
    assert 5 <= val <= 40


def test_rerun_skips_and_force_rebuilds(tmp_path, text_folder, capsys):
    out_dir = tmp_path / "data"
    prepare(source=str(text_folder), out_dir=out_dir, vocab_size=300, val_fraction=0.2)
    chunk = next((out_dir / "train").glob("*.bin"))
    written = chunk.stat().st_mtime_ns
    prepare(source=str(text_folder), out_dir=out_dir, vocab_size=300, val_fraction=0.2)
    assert "already holds this data" in capsys.readouterr().out
    assert chunk.stat().st_mtime_ns == written
    prepare(source=str(text_folder), out_dir=out_dir, vocab_size=300, val_fraction=0.2, force=True)
    assert next((out_dir / "train").glob("*.bin")).stat().st_mtime_ns != written
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no scratch or old dirs left behind


def test_force_through_a_linked_out_dir_rebuilds_where_the_link_points(tmp_path, text_folder, capsys):
    """Data linked to a bigger disk: --force replaces the data there and keeps the link."""
    (tmp_path / "big_disk").mkdir()
    old = prepare(source=str(text_folder), out_dir=tmp_path / "big_disk" / "data", vocab_size=300, val_fraction=0.2)
    (tmp_path / "data").symlink_to(tmp_path / "big_disk" / "data")
    new = prepare(source=str(text_folder), out_dir=tmp_path / "data", vocab_size=280, val_fraction=0.2, force=True)
    assert f"links to {tmp_path / 'big_disk' / 'data'}: the data is prepared there" in capsys.readouterr().out
    assert (tmp_path / "data").is_symlink() and new.tokenizer_fingerprint != old.tokenizer_fingerprint
    assert json.loads((tmp_path / "big_disk" / "data" / MANIFEST).read_text()) == json.loads(json.dumps(asdict(new)))
    assert sorted(path.name for path in (tmp_path / "big_disk").iterdir()) == ["data"]  # no scratch left


def test_jsonl_text_and_chat_records(tmp_path, prepared):
    path = tmp_path / "mixed.jsonl"
    records = [{"text": doc} for doc in make_documents(30, 10, seed=2)]
    records += [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}] * 5
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    documents = list(read_jsonl(path))
    assert len(documents) == 35
    assert documents[-1] == "<|user|>\nHi?\n<|assistant|>\nHello.\n"
    manifest = prepare(source=str(path), out_dir=tmp_path / "out", tokenizer_dir=prepared / "tokenizer")
    assert sum(manifest.documents.values()) == 35
    assert manifest.tokenizer_fingerprint == json.loads((prepared / MANIFEST).read_text())["tokenizer_fingerprint"]


def test_tinystories_from_local_files(tmp_path):
    stories = make_documents(6, 2, seed=3)
    (tmp_path / "TinyStoriesV2-GPT4-train.txt").write_text("<|endoftext|>\n".join(stories[:4]))
    (tmp_path / "TinyStoriesV2-GPT4-valid.txt").write_text("\n<|endoftext|>\n".join(stories[4:]) + "<|endoftext|>")
    source = tinystories_source(cache_dir=tmp_path)  # files present: nothing is downloaded
    assert [doc.strip() for doc in source.documents()] == stories


def test_default_corpus_needs_no_download():
    source = python_docs_source()
    documents = list(source.documents())
    assert source.count == len(documents) > 300
    assert sum(map(len, documents)) > 1_000_000
    assert any("for_stmt" in doc or 'The "for" statement' in doc for doc in documents)


def test_render_chat_rejects_bad_messages():
    with pytest.raises(UserError, match=r"f.jsonl:3: each message needs 'role' and 'content'"):
        render_chat([{"role": "user"}], "f.jsonl:3")


def test_long_documents_are_tokenized_in_pieces_with_the_same_ids(prepared, monkeypatch):
    """A worker's encoder (the `tokenizers` library, no LitGPT) gives LitGPT's Tokenizer's ids, piece by piece."""
    tokenizer = load_tokenizer(prepared / "tokenizer")
    encoder = Encoder.load(TokenizerSpec(str(prepared / "tokenizer"), tokenizer.bos_id, tokenizer.eos_id))
    long = " ".join(make_documents(count=40, sentences=20, seed=4)) + "  two  spaces.\n\n  Indented, after lines"
    documents = [("train", long), ("val", "The cat sees a red ball today."), ("train", "x" * 2500)]
    lengths: list[int] = []
    encode_batch = encoder.encode_batch
    monkeypatch.setattr(encoder, "encode_batch", lambda texts: lengths.extend(map(len, texts)) or encode_batch(texts))
    encoded = list(encode_documents(encoder, documents, piece_chars=1000, batch_chars=3000))
    assert max(lengths) <= 1000 and len(lengths) > len(long) // 1000  # no text longer than a piece reached it
    for (split, document), (got_split, ids) in zip(documents, encoded, strict=True):
        whole = tokenizer.encode(document, bos=True, eos=True).tolist()  # LitGPT's own framing
        assert got_split == split and ids.tolist() == whole
    assert "".join(pieces(long, 1000)) == long and "".join(pieces("y" * 2500, 1000)) == "y" * 2500


def test_special_token_strings_written_in_a_document_are_text(prepared):
    """Only the framing adds BOS and EOS: `<|endoftext|>` written in a document (code, a text about tokenizers)
    would otherwise end it in the middle for the model."""
    tokenizer = load_tokenizer(prepared / "tokenizer")
    encoder = Encoder.load(TokenizerSpec(str(prepared / "tokenizer"), tokenizer.bos_id, tokenizer.eos_id))
    document = "A model ends text with <|endoftext|> and starts it with <|bos|>."
    ((_, ids),) = encode_documents(encoder, [("train", document)])
    ids = ids.tolist()
    assert (ids[0], ids[-1]) == (tokenizer.bos_id, tokenizer.eos_id)
    assert ids.count(tokenizer.bos_id) == ids.count(tokenizer.eos_id) == 1
    assert encoder.processor.decode(ids[1:-1]) == document


def test_other_tokenizer_refused_and_data_kept(tmp_path, prepared, text_folder):
    out_dir = tmp_path / "data"
    prepare(source=str(text_folder), out_dir=out_dir, vocab_size=280, val_fraction=0.2)
    before = {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"manifest\.json: this data was made with another tokenizer .* --force"):
        prepare(source=str(text_folder), out_dir=out_dir, tokenizer_dir=prepared / "tokenizer", val_fraction=0.2)
    after = {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    assert after == before


def test_failed_rebuild_keeps_existing_data(tmp_path, text_folder, monkeypatch):
    import litmoe.data.prepare

    out_dir = tmp_path / "data"
    prepare(source=str(text_folder), out_dir=out_dir, vocab_size=300, val_fraction=0.2)
    manifest = (out_dir / MANIFEST).read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(litmoe.data.prepare, "run_jobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(source=str(text_folder), out_dir=out_dir, vocab_size=300, val_fraction=0.2, force=True)
    assert (out_dir / MANIFEST).read_text() == manifest
    assert sorted(os.listdir(tmp_path)) == [".data.partial", "data"]  # kept, to resume from


@pytest.mark.parametrize(
    "config, generation",
    [
        ({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, None),
        ({"tokenizer_class": "Llama", "bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}}, None),
        ({"tokenizer_class": "PreTrainedTokenizerFast"}, {"bos_token_id": 1, "eos_token_id": 2}),
        ({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}, {"bos_token_id": 1, "eos_token_id": 0}),
        (None, {"bos_token_id": 2, "eos_token_id": 1}),
        ({"tokenizer_class": "X", "bos_token": "<missing>", "eos_token": "</s>"}, None),
        ({"bos_token": "<s>", "eos_token": "</s>"}, None),  # no tokenizer_class: LitGPT's Tokenizer fails
        ({"tokenizer_class": "X", "bos_token": "<s>"}, None),  # no EOS
    ],
)
def test_document_markers_are_litgpt_s_without_importing_it(tmp_path, prepared, config, generation, monkeypatch):
    """prepare_data.py reads BOS/EOS itself (LitGPT takes 12 s to import): the same ids as litgpt.Tokenizer, or
    the same one-line error load_tokenizer gives."""
    from tokenizers import Tokenizer

    import litmoe.data.tokenizer

    vocabulary = Tokenizer.from_file(str(prepared / "tokenizer" / "tokenizer.json"))
    vocabulary.add_special_tokens(["<s>", "</s>", "<|endoftext|>"])
    vocabulary.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    try:
        tokenizer = load_tokenizer(tmp_path)
        expected = (tokenizer.bos_id, tokenizer.eos_id)
    except UserError as err:
        with pytest.raises(UserError) as raised:
            document_markers(tmp_path)
        assert str(raised.value) == str(err)
    else:
        monkeypatch.setattr(litmoe.data.tokenizer, "load_tokenizer", lambda path: pytest.fail("read through LitGPT"))
        assert document_markers(tmp_path) == expected


def test_the_train_loader_keeps_its_workers_and_reshuffles_every_epoch(prepared):
    """Through LitGPT's CycleIterator, as its loop reads: three epochs from the same two worker processes (no fork
    per epoch), each in a new order, each holding every training window exactly once; closed, the workers end."""
    from litgpt.utils import CycleIterator

    from litmoe.data.training_data import DataSource, PreparedData

    data = PreparedData([DataSource(prepared)], num_workers=2)
    data.connect(batch_size=4, max_seq_length=63)
    loader = data.train_dataloader()
    batches = CycleIterator(loader)
    epochs, workers = [], []
    for _ in range(3):
        epochs.append([tuple(row.tolist()) for _ in range(len(loader)) for row in next(batches)])
        workers.append([worker.pid for worker in getattr(loader._iterator, "_workers", [])])
    assert batches.epoch == 2 and len(set(map(tuple, workers))) == 1 and len(workers[0]) == 2
    assert all(len(set(rows)) == len(rows) for rows in epochs)  # nothing repeated within an epoch
    assert set(epochs[0]) == set(epochs[1]) == set(epochs[2])  # nothing lost
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # reshuffled

    data.close()  # as a run ends: no worker outlives it
    assert not [pid for pid in workers[0] if os.path.exists(f"/proc/{pid}") and "Z" not in process_state(pid)]


def test_the_data_continues_from_its_global_position_on_any_number_of_ranks_and_workers(prepared):
    """The windows each rank reads, as the run goes on 1 rank, then 2 (with 2 loader workers each), then 4 with
    another micro-batch size: together, exactly the windows one uninterrupted rank reads from the same positions,
    in the same steps; nothing repeated or skipped within an epoch, the next epoch reshuffled."""
    from litgpt.utils import CycleIterator
    from torch.utils.data import DataLoader

    from litmoe.data.global_order import GlobalBatches

    def read(rank: int, world: int, batch: int, start: int, batches: int, workers: int = 0) -> list[tuple]:
        dataset = GlobalBatches([prepared / "train"], [1.0], 42, 65, batch, rank, world, start)
        loader = CycleIterator(DataLoader(dataset, batch_size=None, num_workers=workers))  # as LitGPT's loop reads
        return [tuple(row.tolist()) for _ in range(batches) for row in next(loader)]

    one_rank = read(0, 1, 4, 0, 400)  # 1,600 windows: more than two epochs of the 713
    epoch = GlobalBatches([prepared / "train"], [1.0], 42, 65, 4, 0, 1, 0).order.windows[0]  # windows in the split
    assert len(set(one_rank[:epoch])) == epoch and set(one_rank[:epoch]) == set(one_rank[epoch : 2 * epoch])
    assert one_rank[:epoch] != one_rank[epoch : 2 * epoch]
    steps = []  # each optimizer step's windows (global batch 16), as the ranks read them
    for world, batch, start, count in ((1, 4, 0, 10), (2, 4, 160, 10), (4, 2, 320, 20)):
        per_rank = [read(rank, world, batch, start, count * 16 // (world * batch), workers=2 if world == 2 else 0)
                    for rank in range(world)]  # fmt: skip
        for step in range(count):
            taken = [per_rank[rank][step * 16 // world : (step + 1) * 16 // world] for rank in range(world)]
            steps.append(sorted(window for share in taken for window in share))
    expected = [sorted(one_rank[step * 16 : (step + 1) * 16]) for step in range(40)]
    assert steps == expected


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
