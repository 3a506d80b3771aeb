"""train-reference at paper scale: training reads prepared (memory-mapped) token files, equals training from the
same blocks held in memory loss for loss, holds out data it never trains on, splits each global batch over
ranks, and takes --tokens, --recipe and --eval-data; bad data is refused in one line before any work."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from fixtures_reference import MICRO, assert_one_line_error, read_json, read_metrics, run_cli  # noqa: F401
from layerprobe.corpus import TokenStore, prepare_data
from layerprobe.errors import LayerprobeError
from layerprobe.training.data import BlockBatches, TokenData, held_out_count, load_token_data, prepare_token_data
from layerprobe.training.distributed import DistEnv
from layerprobe.training.settings import TrainSettings, resolve_plan

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("the model layer norm residual stream token batch step loss deep shallow angle block influence scale "
         "variance gradient warmup cosine paper corpus memory disk index shard read write train eval").split()


def write_corpus(folder, files=3, docs=60, seed=0):
    """Plain-text and jsonl files of generated sentences: a corpus split over several files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def doc():
        return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                        for _ in range(rng.randint(3, 9)))
    for i in range(files):
        if i % 2:
            with open(folder / f"part{i}.jsonl", "w") as f:
                for _ in range(docs):
                    f.write(json.dumps({"text": doc()}) + "\n")
        else:
            (folder / f"part{i}.txt").write_text("\n\n".join(doc() for _ in range(docs)))
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = write_corpus(root / "text")
    res = prepare_data(str(src), "bpe:300", root / "prep", progress=False)
    return src, res.path


def train_args(data, out, *extra):
    return ["train-reference", *MICRO, "--norm", "pre", "--steps", 6, "--eval-every", 3, "--seq-len", 16,
            "--batch-size", 4, "--eval-samples", 6, "--data", data, "--out", out, *map(str, extra)]


# ---- one data path: memmap == in memory ----------------------------------------------------------------------

def test_training_from_the_memmap_equals_training_from_blocks_in_memory(prepared, tmp_path, monkeypatch):
    _, prep = prepared
    result, text = run_cli(*train_args(prep, tmp_path / "mm"))
    assert result.exit_code == 0, text
    from_disk = read_metrics(tmp_path / "mm" / "pre")

    # The same token ids, read in the test with numpy and packed into a tensor held in memory.
    index = json.loads((prep / "index.json").read_text())
    ids = torch.from_numpy(np.fromfile(prep / "tokens.bin", dtype=index["dtype"]).astype(np.int64))
    n = ids.numel() // 16
    blocks = ids[: n * 16].view(n, 16).clone()
    k = held_out_count(n, 6, 4)
    from transformers import AutoTokenizer

    import layerprobe.training.trainer as trainer

    tok = AutoTokenizer.from_pretrained(prep / "tokenizer")
    in_memory = TokenData(train=blocks[: n - k], eval=blocks[n - k:], total_tokens=ids.numel(), tokenizer=tok,
                          embedding_rows=320)
    monkeypatch.setattr(trainer, "_token_data", lambda plan, env, say: in_memory)
    result, text = run_cli(*train_args(prep, tmp_path / "mem"))
    assert result.exit_code == 0, text
    held = read_metrics(tmp_path / "mem" / "pre")
    assert len(from_disk) == len(held) == 6
    for a, b in zip(from_disk, held):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]  # bit for bit
    assert from_disk[-1]["eval_loss"] == held[-1]["eval_loss"]
    assert read_json(tmp_path / "mm" / "pre" / "config.json")["vocab_size"] == 320  # 300 ids rounded up to 64


def test_a_text_spec_is_prepared_once_into_the_cache_and_reused(prepared, tmp_path, token_cache):
    src, prep = prepared
    before = set((token_cache / "tokens").glob("*")) if (token_cache / "tokens").exists() else set()
    result, text = run_cli(*train_args(src, tmp_path / "a", "--tokenizer", "bpe:300"))
    assert result.exit_code == 0, text
    made = set((token_cache / "tokens").glob("*")) - before
    assert len(made) == 1
    cached = made.pop()
    # The cache holds exactly the ids of the explicit preparation of the same spec and tokenizer.
    assert (cached / "tokens.bin").read_bytes() == (prep / "tokens.bin").read_bytes()
    result, text = run_cli(*train_args(src, tmp_path / "b", "--tokenizer", "bpe:300"))
    assert result.exit_code == 0, text
    assert set((token_cache / "tokens").glob("*")) - before == {cached}  # reused, not prepared again
    assert comparable_losses(tmp_path / "a") == comparable_losses(tmp_path / "b")
    assert comparable_losses(tmp_path / "a") == comparable_losses_of(tmp_path, prep)


def comparable_losses(out):
    return [r["loss"] for r in read_metrics(out / "pre")]


def comparable_losses_of(tmp_path, prep):
    result, text = run_cli(*train_args(prep, tmp_path / "p"))
    assert result.exit_code == 0, text
    return comparable_losses(tmp_path / "p")


def test_the_demo_helper_rebuilds_the_runs_held_out_blocks(prepared, tmp_path, token_cache):
    """prepare_token_data (the demo's) with the tokenizer a run saved gives that run's held-out blocks, from the
    cache entry the run made (no second preparation)."""
    from transformers import AutoTokenizer

    src, prep = prepared
    result, text = run_cli(*train_args(src, tmp_path / "r", "--vocab-size", 300))
    assert result.exit_code == 0, text
    entries = set((token_cache / "tokens").glob("*"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "r" / "pre")
    data = prepare_token_data(str(src), tok, seq_len=16, batch_size=4, eval_samples=6, seed=0)
    assert set((token_cache / "tokens").glob("*")) == entries
    ids = np.fromfile(prep / "tokens.bin", dtype=np.uint16).astype(np.int64)
    n = len(ids) // 16
    k = held_out_count(n, 6, 4)
    assert torch.equal(data.eval, torch.from_numpy(ids[(n - k) * 16: n * 16].reshape(k, 16)))


# ---- held-out data and ranks ------------------------------------------------------------------------------------

def test_the_held_out_slice_never_enters_training(prepared):
    _, prep = prepared
    data = load_token_data(str(prep), None, seq_len=16, batch_size=4, eval_samples=6)
    store = TokenStore(prep)
    n = store.num_blocks(16)
    assert len(data.train) + len(data.eval) == n and len(data.eval) == held_out_count(n, 6, 4)
    source = BlockBatches(data.train, 4, seed=1)
    steps = 3 * len(data.train) // 4  # three epochs
    seen = torch.cat([source.rows(s) for s in range(steps)])
    assert seen.max() < len(data.train) and set(seen.tolist()) == set(range(len(data.train)))
    # By content too: no held-out block is ever a training batch's row.
    held = {tuple(b.tolist()) for b in data.eval}
    for s in range(0, steps, 7):
        assert not held & {tuple(b.tolist()) for b in source.batch(s)}
    assert torch.equal(data.eval, store.blocks(range(n - len(data.eval), n), 16))


def test_eval_data_is_a_separate_set_tokenized_like_the_training_data(prepared, tmp_path):
    src, prep = prepared
    ev = write_corpus(tmp_path / "val", files=1, docs=30, seed=9)
    data = load_token_data(str(prep), None, seq_len=16, batch_size=4, eval_samples=5, eval_spec=str(ev))
    assert len(data.train) == TokenStore(prep).num_blocks(16)  # nothing cut from the training data
    ev_store = TokenStore(data.eval_source.split("(")[-1].rstrip(")"))
    assert ev_store.index["tokenizer"]["fingerprint"] == TokenStore(prep).index["tokenizer"]["fingerprint"]
    assert torch.equal(data.eval, ev_store.blocks(range(5), 16))
    result, text = run_cli(*train_args(prep, tmp_path / "o", "--eval-data", ev))
    assert result.exit_code == 0, text
    assert read_json(tmp_path / "o" / "pre" / "run.json")["identity"]["train"]["eval_data"] == str(ev)


class CountingView:
    """A block view that records which rows were read."""

    def __init__(self, view):
        self.view, self.read = view, []

    def __len__(self):
        return len(self.view)

    def __getitem__(self, rows):
        self.read.extend(torch.as_tensor(rows).tolist())
        return self.view[rows]


def test_each_rank_reads_only_its_rows_and_together_they_make_the_global_batch(prepared):
    _, prep = prepared
    data = load_token_data(str(prep), None, seq_len=16, batch_size=8, eval_samples=6)
    whole = BlockBatches(data.train, 8, seed=3)
    for world in (2, 4):
        views = [CountingView(data.train) for _ in range(world)]
        sources = [BlockBatches(v, 8, seed=3) for v in views]
        for step in (0, 1, 5, 40):
            parts = [sources[r].batch(step, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), whole.batch(step))
            rows = [set(sources[r].rows(step, r, world).tolist()) for r in range(world)]
            assert all(not (rows[a] & rows[b]) for a in range(world) for b in range(a + 1, world))
            assert set().union(*rows) == set(whole.rows(step).tolist())
        for r, v in enumerate(views):  # a rank read its own rows of each step, nothing else
            mine = [i for step in (0, 1, 5, 40) for i in sources[r].rows(step, r, world).tolist()]
            assert v.read == mine


# ---- budgets and recipes ------------------------------------------------------------------------------------------

def test_a_recipe_sets_exactly_the_documented_hyperparameters():
    plan = resolve_plan(TrainSettings(recipe="mixln-71m", device="cpu"), DistEnv())
    s = plan.settings
    assert plan.schemes == ["post", "deepnorm", "pre", "mix"] and plan.preset == "71m"
    assert (plan.steps, plan.batch_size, plan.seq_len, plan.lr) == (10_000, 512, 256, 1e-3)
    assert plan.warmup_steps == 1000 and s.min_lr_ratio == 0.1
    assert s.weight_decay == 0.0 and s.grad_clip == 0.0
    assert s.dtype == "bfloat16" and plan.autocast_dtype == torch.bfloat16
    assert s.post_ln_layers == 3 and s.tokenizer == "t5-base" and s.vocab_size == 32000
    assert s.eval_every == 1000 and s.eval_samples == -(-10_000_000 // 256)  # 10M held-out tokens, whole blocks
    assert plan.steps * plan.batch_size * plan.seq_len == 1_310_720_000
    lns = resolve_plan(TrainSettings(recipe="lns-130m", device="cpu"), DistEnv())
    assert lns.schemes == ["pre", "lns"] and lns.preset == "130m" and lns.steps == 20_000 and lns.lr == 1e-3
    # Explicit settings win over the recipe, and only those.
    mine = resolve_plan(TrainSettings(recipe="mixln-71m", device="cpu", lr=5e-4, grad_clip=1.0, norm="pre",
                                      seq_len=128), DistEnv())
    assert mine.lr == 5e-4 and mine.settings.grad_clip == 1.0 and mine.schemes == ["pre"] and mine.seq_len == 128
    assert mine.steps == 10_000 and mine.settings.weight_decay == 0.0 and mine.settings.eval_samples == 10_000_000 // 128
    plain = resolve_plan(TrainSettings(device="cpu"), DistEnv()).settings  # no recipe: the defaults
    assert (plain.grad_clip, plain.warmup_ratio, plain.dtype, plain.eval_samples) == (1.0, 0.1, "auto", 64)


def test_a_token_budget_sets_the_steps():
    plan = resolve_plan(TrainSettings(recipe="mixln-71m", tokens="1.1B", device="cpu"), DistEnv())
    assert plan.steps == -(-1_100_000_000 // (512 * 256)) == 8393 and plan.budget_tokens == 1_100_000_000
    with pytest.raises(LayerprobeError, match="--steps and --tokens"):
        resolve_plan(TrainSettings(steps=3, tokens="1M", device="cpu"), DistEnv())
    with pytest.raises(LayerprobeError, match="--tokens must be"):
        resolve_plan(TrainSettings(tokens="lots", device="cpu"), DistEnv())


def test_recipe_on_the_command_line_prints_the_plan_and_flags_override(prepared, tmp_path):
    _, prep = prepared
    result, text = run_cli("train-reference", "--recipe", "mixln-71m", "--preset", "micro", "--device", "cpu",
                           "--norm", "mix", "--tokens", 192, "--batch-size", 4, "--seq-len", 16, "--eval-every", 3,
                           "--eval-samples", 6, "--dtype", "float32", "--tokenizer", "bpe:300", "--vocab-size", 320,
                           "--data", prep, "--out", tmp_path)
    assert result.exit_code == 0, text
    assert "recipe mixln-71m" in text and "(--preset overrides '71m')" in text and "(--dtype overrides" in text
    assert "3 steps x 4 x 16 = 192 tokens" in text and "embedding: 320 rows" in text
    settings = read_json(tmp_path / "mix" / "run.json")["settings"]
    # The recipe's values where no flag was given...
    assert (settings["lr"], settings["grad_clip"], settings["weight_decay"]) == (1e-3, 0.0, 0.0)
    assert (settings["warmup_ratio"], settings["min_lr_ratio"], settings["post_ln_layers"]) == (0.1, 0.1, 3)
    # ...and the flags' where they were.
    assert (settings["preset"], settings["norm"], settings["dtype"], settings["batch_size"]) == ("micro", "mix", "float32", 4)
    assert len(read_metrics(tmp_path / "mix")) == 3
    assert read_json(tmp_path / "mix" / "config.json")["post_ln_layers"] == 3


# ---- bad input ------------------------------------------------------------------------------------------------------

def test_a_corpus_too_small_for_one_batch_says_tokens_found_and_needed(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus. " * 40)
    result, text = run_cli(*train_args(small, tmp_path / "o", "--batch-size", 64))
    assert_one_line_error(result, text, "small.txt", "tokens", "one batch of 64", f"{65 * 16:,} tokens")
    assert not (tmp_path / "o").exists()


def test_a_prepared_folder_with_another_tokenizer_is_refused_naming_both(prepared, tmp_path):
    _, prep = prepared
    result, text = run_cli(*train_args(prep, tmp_path / "o", "--tokenizer", "bpe:400"))
    assert_one_line_error(result, text, "'bpe:300'", "bpe:400")
    assert not (tmp_path / "o").exists()


def test_a_truncated_token_file_is_refused(prepared, tmp_path):
    _, prep = prepared
    cut = tmp_path / "cut"
    shutil.copytree(prep, cut)
    size = (cut / "tokens.bin").stat().st_size
    with open(cut / "tokens.bin", "r+b") as f:
        f.truncate(size - 10)
    result, text = run_cli(*train_args(cut, tmp_path / "o"))
    assert_one_line_error(result, text, "truncated", f"{size - 10:,} bytes")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec,needle", [("nowhere/c4.json.gz", "no such data file or folder"),
                                         ("notes.docx", "unsupported data file")])
def test_a_spec_that_is_no_data_is_refused_before_any_work(tmp_path, spec, needle):
    (tmp_path / "notes.docx").write_text("x")
    result, text = run_cli(*train_args(tmp_path / spec, tmp_path / "o"))
    assert_one_line_error(result, text, "--data", needle)
    result, text = run_cli(*train_args("builtin", tmp_path / "o", "--eval-data", tmp_path / spec))
    assert_one_line_error(result, text, "--eval-data", needle)
    assert not (tmp_path / "o").exists()
