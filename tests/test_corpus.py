"""Streaming preparation of a corpus into a memory-mapped token file, and the token store training reads.

Every comparison is against an independent computation written here: the files are read with plain
gzip/json/csv/pyarrow loops, each document encoded with the tokenizer's own encode() + EOS, concatenated
and cut into blocks in memory."""

from __future__ import annotations

import csv
import errno
import gzip
import json
import random
import sys
import types

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli
from layerprobe.corpus import (
    TokenStore,
    iter_documents,
    permute,
    prepare_data,
    split_store,
    step_rows,
)
from layerprobe.corpus import prepare as prep_mod
from layerprobe.corpus import readers
from layerprobe.errors import LayerprobeError

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not first one their its new after who they have two been other all year time city team during school "
         "river music game film state world history national series north south people season").split()


def _doc(rng: random.Random, words: int) -> str:
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(WORDS) if rng.random() > 0.05 else str(rng.randrange(1000)))
        if rng.random() < 0.08:
            lines.append(" ".join(line) + rng.choice([".", ",", "!", ""]))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + ("\n\n  indented line\n" if rng.random() < 0.3 else "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~3 MB of text over a .txt (one document, bigger than a reader piece), a .jsonl.gz, a .csv and a
    .parquet with several row groups; plus the documents in reading order, read here independently."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    d = root / "data"
    d.mkdir()
    big = "".join(_doc(rng, 400) for _ in range(350))  # one ~680 KB document: cut into pieces by the reader
    assert len(big) > 2 * readers.PIECE_CHARS
    (d / "a_book.txt").write_text(big, encoding="utf-8")
    rows = [_doc(rng, rng.randrange(20, 600)) for _ in range(900)]
    with gzip.open(d / "b_c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as f:
        for t in rows:
            f.write(json.dumps({"text": t, "url": "x"}) + "\n")
    csv_rows = [_doc(rng, rng.randrange(20, 400)) for _ in range(600)]
    with open(d / "c_table.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[i, t] for i, t in enumerate(csv_rows)])
    pq_rows = [_doc(rng, rng.randrange(20, 400)) for _ in range(600)]
    pq.write_table(pa.table({"text": pq_rows}), d / "d_rows.parquet", row_group_size=100)

    # Independent read, in the documented order (files sorted by path).
    docs = [(d / "a_book.txt").read_text(encoding="utf-8")]
    with gzip.open(d / "b_c4-train.00000-of-01024.json.gz", "rt", encoding="utf-8") as f:
        docs += [json.loads(line)["text"] for line in f]
    with open(d / "c_table.csv", encoding="utf-8", newline="") as f:
        docs += [r["text"] for r in csv.DictReader(f)]
    docs += pq.read_table(d / "d_rows.parquet").column("text").to_pylist()

    # One tokenizer for the module: a byte-level BPE trained on a sample, saved as a folder.
    from layerprobe.corpus import train_bpe_on_sample

    tok = train_bpe_on_sample(iter(docs[:200]), 1000)
    tok_dir = root / "tok"
    tok.save_pretrained(tok_dir)
    return types.SimpleNamespace(root=root, data=d, docs=docs, tok=tok, tok_dir=str(tok_dir))


def reference_ids(docs, tok) -> np.ndarray:
    out: list[int] = []
    for t in docs:
        out += tok.encode(t, add_special_tokens=False)
        out.append(tok.eos_token_id)
    return np.array(out, dtype=np.int64)


def test_reader_yields_every_document_in_order(corpus):
    assert list(iter_documents(str(corpus.data))) == corpus.docs
    pieces = list(readers.iter_pieces(str(corpus.data / "a_book.txt")))
    assert len(pieces) > 2 and all(len(p.text) < 2 * readers.PIECE_CHARS for p in pieces)
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]


def test_prepared_stream_and_blocks_equal_in_memory_reference(corpus, tmp_path):
    res = prepare_data(str(corpus.data), corpus.tok_dir, tmp_path / "prep", progress=False, chunk_bytes=300_000)
    ref = reference_ids(corpus.docs, corpus.tok)
    store = TokenStore(res.path, tokenizer=corpus.tok_dir)
    assert store.dtype == np.uint16 and len(store) == len(ref)
    np.testing.assert_array_equal(np.asarray(store.tokens, dtype=np.int64), ref)
    ix = res.index
    assert ix["documents"] == len(corpus.docs) and ix["tokens"] == len(ref)
    assert ix["bytes"] == (tmp_path / "prep" / "tokens.bin").stat().st_size == 2 * len(ref)
    assert ix["tokenizer"]["eos_id"] == corpus.tok.eos_token_id and ix["tokenizer"]["max_id"] == int(ref.max())
    assert ix["tokenizer"]["vocab_len"] == len(corpus.tok) and ix["format_version"] == 1
    # blocks by index == the in-memory token list cut into blocks
    L = 64
    mem = torch.from_numpy(ref[: len(ref) // L * L].reshape(-1, L))
    assert store.num_blocks(L) == len(mem)
    pick = [0, 5, len(mem) - 1, 17, 5]
    assert torch.equal(store.blocks(pick, L), mem[pick])
    assert torch.equal(store.block(3, L), mem[3])
    assert store.blocks(pick, L).dtype == torch.long
    split = split_store(store, L, batch_size=8, eval_blocks=10)
    assert len(split.train) == len(mem) - 10 and len(split.eval) == 10
    assert torch.equal(split.eval[list(range(10))], mem[-10:])  # held out: the last blocks, never trained on
    assert torch.equal(split.train[torch.tensor([0, 3])], mem[[0, 3]])
    assert split.train[torch.arange(len(split.train))].shape[0] == len(mem) - 10


def test_interrupted_preparation_resumes_to_the_same_stream(corpus, tmp_path, monkeypatch):
    one_go = prepare_data(str(corpus.data), corpus.tok_dir, tmp_path / "one", progress=False, chunk_bytes=200_000)
    real = prep_mod._write_chunk
    calls = {"n": 0}

    def dies_mid_chunk(f, arr):
        calls["n"] += 1
        if calls["n"] == 4:  # half a chunk reaches the disk, progress.json does not: a kill mid-write
            f.write(arr.tobytes()[: arr.nbytes // 2])
            f.flush()
            raise KeyboardInterrupt
        real(f, arr)

    monkeypatch.setattr(prep_mod, "_write_chunk", dies_mid_chunk)
    out = tmp_path / "two"
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(corpus.data), corpus.tok_dir, out, progress=False, chunk_bytes=200_000)
    assert not (out / "index.json").exists() and not (out / "tokens.bin").exists()  # never looks complete
    with pytest.raises(LayerprobeError, match="not a prepared data folder"):
        TokenStore(out)
    monkeypatch.setattr(prep_mod, "_write_chunk", real)
    state = json.loads((out / "progress.json").read_text())
    assert state["pieces"] > 0 and state["tokens"] > 0
    resumed = prepare_data(str(corpus.data), corpus.tok_dir, out, progress=False, chunk_bytes=200_000)
    assert not resumed.reused
    assert (out / "tokens.bin").read_bytes() == (tmp_path / "one" / "tokens.bin").read_bytes()
    assert resumed.index["documents"] == one_go.index["documents"]
    assert not (out / "progress.json").exists()
    again = prepare_data(str(corpus.data), corpus.tok_dir, out, progress=False)
    assert again.reused


def test_bpe_trained_on_a_bounded_sample_and_the_cache(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("layerprobe.corpus.vocab.SAMPLE_BYTES", 200_000)
    seen = {}
    real = prep_mod.train_bpe_on_sample

    def spy(pieces, vocab_size, max_bytes=None):
        tok = real(pieces, vocab_size, max_bytes=200_000)
        seen["vocab"] = vocab_size
        return tok

    monkeypatch.setattr(prep_mod, "train_bpe_on_sample", spy)
    spec = str(corpus.data / "b_c4-train.00000-of-01024.json.gz")
    res = prepare_data(spec, "bpe:600", progress=False)
    assert res.path.parent == tmp_path / "cache" / "tokens" and seen["vocab"] == 600
    assert res.index["tokenizer"]["name"] == "bpe:600" and res.index["tokenizer"]["vocab_len"] == 600
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(res.path / "tokenizer")
    docs = [json.loads(line)["text"] for line in gzip.open(spec, "rt", encoding="utf-8")]
    np.testing.assert_array_equal(np.asarray(TokenStore(res.path).tokens, np.int64), reference_ids(docs, saved))
    seen.clear()
    assert prepare_data(spec, "bpe:600", progress=False).reused and not seen  # the cache: no second training
    assert TokenStore(res.path, tokenizer="bpe:600").n_tokens == res.index["tokens"]


def test_step_rows_pure_disjoint_and_a_permutation_per_epoch():
    n, B = 1000, 64
    for world in (1, 2, 4, 8):
        for step in (0, 7, 15, 16, 30):  # step 15 (rows 960-1023) crosses the first epoch boundary
            glob = step_rows(step, n_blocks=n, batch_size=B, seed=3)
            parts = [step_rows(step, n_blocks=n, batch_size=B, seed=3, rank=r, world_size=world) for r in range(world)]
            assert torch.equal(torch.cat(parts), glob)
            if step != 15:  # inside one epoch rows of a batch are distinct
                assert len(set(glob.tolist())) == B
    epoch0 = torch.cat([step_rows(s, n_blocks=n, batch_size=100, seed=3) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(n))  # each block exactly once per epoch
    epoch1 = torch.cat([step_rows(s, n_blocks=n, batch_size=100, seed=3) for s in range(10, 20)])
    assert sorted(epoch1.tolist()) == list(range(n)) and not torch.equal(epoch0, epoch1)
    assert not torch.equal(step_rows(0, n_blocks=n, batch_size=B, seed=4), step_rows(0, n_blocks=n, batch_size=B, seed=3))
    for m in (1, 2, 3, 17, 4096, 4097, 4_000_000):
        idx = np.arange(min(m, 5000))
        p = permute(idx, m, seed=1, epoch=0)
        assert p.min() >= 0 and p.max() < m and len(set(p.tolist())) == len(idx)
    with pytest.raises(LayerprobeError, match="does not split evenly"):
        step_rows(0, n_blocks=n, batch_size=10, seed=0, world_size=4)


def test_hf_streaming_spec_reads_rows_as_they_arrive(corpus, tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))

        def rows():  # a stream: rows produced one by one, as datasets' IterableDataset does
            for t in corpus.docs[:300]:
                yield {"text": t, "timestamp": "x"}

        return rows()

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name: object())
    res = prepare_data("hf:allenai/c4:en:train", corpus.tok_dir, tmp_path / "hf", progress=False)
    assert calls == [("allenai/c4", "en", "train", True)]
    np.testing.assert_array_equal(np.asarray(TokenStore(res.path).tokens, np.int64), reference_ids(corpus.docs[:300], corpus.tok))


def _endless_hf(monkeypatch, docs, rows_in_split: int | None = None):
    """A fake `datasets` whose streamed split never ends (as C4's train split effectively does for a run), or
    ends after `rows_in_split` rows; returns the list of rows pulled so far."""
    pulled = []

    def load_dataset(name, config=None, split=None, streaming=False):
        def rows():
            i = 0
            while rows_in_split is None or i < rows_in_split:
                pulled.append(i)
                yield {"text": docs[i % len(docs)]}
                i += 1

        return rows()

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name: object())
    return pulled


def test_max_tokens_reads_an_endless_stream_only_as_far_as_asked(corpus, tmp_path, monkeypatch):
    import threading

    docs = corpus.docs[1:400]  # the stream's documents, repeated for ever
    pulled = _endless_hf(monkeypatch, docs)
    threads_before = set(threading.enumerate())
    cap = 60_001  # about 140 documents in: the reader runs a few chunks ahead of the tokenizer, no more
    res = prepare_data("hf:allenai/c4:en:train", corpus.tok_dir, tmp_path / "hf", max_tokens=cap, progress=False,
                       chunk_bytes=30_000)
    ref = reference_ids(docs, corpus.tok)
    assert len(ref) > cap  # the cap falls inside the first pass over the documents
    np.testing.assert_array_equal(np.asarray(TokenStore(res.path).tokens, np.int64), ref[:cap])
    ends = np.flatnonzero(ref == corpus.tok.eos_token_id) + 1  # where each reference document ends
    assert res.index["documents"] == int((ends <= cap).sum())  # the document cut at the cap is not counted
    assert res.index["source"]["max_tokens"] == cap and res.index["source"]["capped"] is True
    assert len(pulled) < len(docs)  # the stream is endless: it was left after a few chunks of read-ahead
    for _ in range(50):  # and the reader thread ended with it (it polls every 0.1 s)
        if set(threading.enumerate()) <= threads_before:
            break
        threading.Event().wait(0.1)
    assert set(threading.enumerate()) <= threads_before
    again = prepare_data("hf:allenai/c4:en:train", corpus.tok_dir, tmp_path / "hf", max_tokens=cap, progress=False)
    assert again.reused
    with pytest.raises(LayerprobeError, match="already holds prepared data"):  # another cap is another preparation
        prepare_data("hf:allenai/c4:en:train", corpus.tok_dir, tmp_path / "hf", max_tokens=cap + 1, progress=False)


def test_max_tokens_above_the_source_keeps_it_whole_and_a_bad_cap_is_refused(corpus, tmp_path):
    small = corpus.data / "b_c4-train.00000-of-01024.json.gz"
    whole = prepare_data(str(small), corpus.tok_dir, tmp_path / "whole", progress=False)
    capped = prepare_data(str(small), corpus.tok_dir, tmp_path / "capped", max_tokens=10**9, progress=False)
    assert (tmp_path / "whole" / "tokens.bin").read_bytes() == (tmp_path / "capped" / "tokens.bin").read_bytes()
    assert capped.index["documents"] == whole.index["documents"] and capped.index["source"]["capped"] is False
    for bad in (0, -5, 2.5):
        with pytest.raises(LayerprobeError, match="--max-tokens must be a positive whole number"):
            prepare_data(str(small), corpus.tok_dir, tmp_path / "bad", max_tokens=bad, progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(LayerprobeError, match="already prepared: --max-tokens applies to text"):
        prepare_data(str(tmp_path / "whole"), max_tokens=100, progress=False)


def test_training_on_a_streamed_dataset_tokenizes_only_what_the_run_reads(corpus, tmp_path, monkeypatch):
    from layerprobe.training.data import load_token_data

    pulled = _endless_hf(monkeypatch, corpus.docs[1:400])
    monkeypatch.setenv("LAYERPROBE_CACHE", str(tmp_path / "cache"))
    data = load_token_data("hf:allenai/c4:en:train", corpus.tok_dir, seq_len=64, batch_size=8, eval_samples=16,
                           train_blocks=100 * 8)
    assert len(data.train) == 100 * 8 and len(data.eval) == 16  # every block read once, the tail held out
    assert data.total_tokens == (100 * 8 + 16) * 64  # and the endless stream was left: this line is reached
    assert pulled and prep_mod.CHUNK_BYTES * 6 > sum(len(corpus.docs[1 + i % 399]) for i in pulled)  # read-ahead only
    # A short run: the stream is read to 20 held-out's worth, so the 5% rule still leaves all 16 held out.
    short = load_token_data("hf:allenai/c4:en:train", corpus.tok_dir, seq_len=64, batch_size=8, eval_samples=16,
                            train_blocks=10 * 8)
    assert len(short.eval) == 16 and len(short.train) >= 10 * 8 and short.total_tokens == 20 * 16 * 64
    # Its length is part of the run's identity: extending the run would train on other data, so resume refuses.
    from layerprobe.training import TrainSettings
    from layerprobe.training.distributed import DistEnv
    from layerprobe.training.settings import identity_differences, model_config, resolve_plan, run_identity

    def identity(**kw):
        plan = resolve_plan(TrainSettings(preset="micro", norm="pre", progress=False, **kw), DistEnv())
        return run_identity(plan, model_config(plan, "pre", 512, None), None)

    hf = dict(data="hf:allenai/c4:en:train", tokenizer=corpus.tok_dir)
    assert identity(**hf, steps=10)["train"]["data_tokens"] == max(10 * 8 + 64, 20 * 64) * 32
    assert identity_differences(identity(**hf, steps=10), identity(**hf, steps=1000)) == [
        f"data_tokens {20 * 64 * 32!r} -> {(1000 * 8 + 64) * 32!r}"]
    assert "data_tokens" not in identity(data="builtin", steps=10)["train"]  # files: a run can be extended


def test_a_streamed_runs_held_out_blocks_are_rebuilt_from_the_same_prefix(corpus, tmp_path, monkeypatch):
    from layerprobe.demo_pipeline import heldout_blocks
    from layerprobe.training import train_reference

    docs = corpus.docs[1:400]
    _endless_hf(monkeypatch, docs, rows_in_split=4 * len(docs))  # a long split, read only in part
    monkeypatch.setenv("LAYERPROBE_CACHE", str(tmp_path / "cache"))
    summary = train_reference(norm="pre", preset="micro", steps=3, data="hf:allenai/c4:en:train",
                              tokenizer=corpus.tok_dir, eval_samples=16, out=str(tmp_path / "runs"), progress=False)
    run = summary.runs[0]
    assert run.status == "completed"
    rebuilt = np.load(heldout_blocks(tmp_path / "runs" / "pre", tmp_path / "heldout.npy", progress=False))
    # Plain: the stream's ids, cut where the run stopped reading (20 held-out sets of 16 blocks of 32 tokens,
    # more than 3 steps x 8 need), the last 16 blocks held out.
    ref = np.concatenate([reference_ids(docs, corpus.tok)] * 4)[: 20 * 16 * 32].reshape(-1, 32)
    np.testing.assert_array_equal(rebuilt, ref[-16:])


def test_prepare_data_cli_max_tokens(corpus, tmp_path):
    small = corpus.data / "b_c4-train.00000-of-01024.json.gz"
    result, text = run_cli("prepare-data", small, "--tokenizer", corpus.tok_dir, "--out", tmp_path / "p",
                           "--max-tokens", "20K", "-q")
    assert result.exit_code == 0, text
    flat = " ".join(text.split())  # the console wraps at 80 columns
    assert "20,000 tokens" in flat and "stopped at --max-tokens 20,000" in flat
    result, text = run_cli("prepare-data", small, "--max-tokens", "lots", "--out", tmp_path / "q")
    assert_one_line_error(result, text, "--max-tokens must be a count such as")
    assert not (tmp_path / "q").exists()


# ---- bad input: one clear error, before work -------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "p"
    prepare_data(str(corpus.data / "c_table.csv"), corpus.tok_dir, out, progress=False)
    return out


def _copy(prepared, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(prepared, dst)
    return dst


def test_corpus_too_small_for_one_batch(prepared):
    store = TokenStore(prepared)
    n = store.num_blocks(256)
    with pytest.raises(LayerprobeError, match=rf"holds {store.n_tokens:,} tokens .* needs {(n + 1) * 256:,} tokens"):
        split_store(store, 256, batch_size=n, eval_blocks=1)


def test_prepared_with_another_tokenizer(corpus, prepared, tmp_path):
    from layerprobe.corpus import train_bpe_on_sample

    other = tmp_path / "other_tok"
    train_bpe_on_sample(iter(corpus.docs[:50]), 700).save_pretrained(other)
    with pytest.raises(LayerprobeError, match=r"made with tokenizer '.*tok'.*not '.*other_tok'"):
        TokenStore(prepared, tokenizer=str(other))
    with pytest.raises(LayerprobeError, match=r"made with tokenizer .* not 'bpe:512'"):
        prepare_data(str(prepared), "bpe:512", progress=False)
    assert prepare_data(str(prepared), corpus.tok_dir, progress=False).reused  # the same one: used as it is
    assert prepare_data(str(prepared), progress=False).reused  # no tokenizer named: used as it is


def test_truncated_file_and_index_mismatch(prepared, tmp_path):
    d = _copy(prepared, tmp_path)
    size = (d / "tokens.bin").stat().st_size
    with open(d / "tokens.bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(LayerprobeError, match=rf"has {size - 2:,} bytes, but its index says .* = {size:,} bytes"):
        TokenStore(d)
    with open(d / "tokens.bin", "r+b") as f:
        f.truncate(size)
    ix = json.loads((d / "index.json").read_text())
    ix["tokens"] += 1
    (d / "index.json").write_text(json.dumps(ix))
    with pytest.raises(LayerprobeError, match="truncated or does not belong to this index"):
        TokenStore(d)


def test_spec_that_is_nothing_known(tmp_path, corpus):
    (tmp_path / "notes.xyz").write_text("hello")
    with pytest.raises(LayerprobeError, match="unsupported data file notes.xyz"):
        prepare_data(str(tmp_path / "notes.xyz"), corpus.tok_dir, tmp_path / "o", progress=False)
    with pytest.raises(LayerprobeError, match="no such data file or folder"):
        prepare_data(str(tmp_path / "missing"), corpus.tok_dir, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_disk_full_up_front_and_during(corpus, tmp_path, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(prep_mod.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(LayerprobeError, match=r"needs about [\d,]+ MB in .* and only 0 MB are free"):
        prepare_data(str(corpus.data), corpus.tok_dir, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    real, calls = prep_mod._write_chunk, {"n": 0}

    def enospc(f, arr):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, arr)

    monkeypatch.setattr(prep_mod, "_write_chunk", enospc)
    out = tmp_path / "o2"
    with pytest.raises(LayerprobeError, match=rf"the disk holding {out} filled up after [\d.]+ MB of token ids \(about [\d,]+ MB in all needed\)"):
        prepare_data(str(corpus.data), corpus.tok_dir, out, progress=False, chunk_bytes=200_000)
    assert not (out / "tokens.bin.partial").exists() and not (out / "index.json").exists()


def test_cli_prepare_data_and_its_errors(corpus, prepared, tmp_path):
    out = tmp_path / "cli"
    result, text = run_cli("prepare-data", corpus.data / "c_table.csv", "--tokenizer", corpus.tok_dir, "--out", out, "-q")
    assert result.exit_code == 0, text
    assert (out / "tokens.bin").read_bytes() == (prepared / "tokens.bin").read_bytes()
    assert "600 documents" in text and "embedding of 1,024 rows" in text
    result, text = run_cli("prepare-data", tmp_path / "missing.txt", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "no such data file or folder")
    result, text = run_cli("prepare-data", prepared, "--tokenizer", "bpe:300")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "made with tokenizer", "bpe:300")
    result, text = run_cli("prepare-data", corpus.data / "c_table.csv", "--tokenizer", "bpe:12", "--out", tmp_path / "y")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "at least 257 ids")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_concurrent_preparations_of_one_spec_prepare_it_once(corpus, tmp_path, monkeypatch):
    """Two processes asking for the same data at once (the demo's workers, two runs sharing the cache): one
    prepares, the other waits for it and reuses the folder; neither sees a half-written one."""
    import functools
    import multiprocessing

    monkeypatch.setenv("LAYERPROBE_CACHE", str(tmp_path / "cache"))  # inherited by the spawned processes
    spec = str(corpus.data / "b_c4-train.00000-of-01024.json.gz")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(functools.partial(prepare_data, tokenizer="bpe:600", progress=False), [spec, spec])
    assert results[0].path == results[1].path
    assert sorted(r.reused for r in results) == [False, True]
    assert results[0].index["tokens"] == results[1].index["tokens"] > 0
    assert TokenStore(results[0].path, tokenizer="bpe:600").n_tokens == results[0].index["tokens"]
