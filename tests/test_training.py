"""`layerprobe train-reference`: checkpoints, metrics, exact resume after a real kill, Ctrl-C, divergence,
one-line errors for bad input, and data parallelism that reproduces the single-process losses."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import layerprobe  # noqa: F401
from fixtures_reference import (
    MICRO,
    REPO,
    assert_one_line_error,
    comparable,
    env_single_thread,
    read_json,
    read_metrics,
    run_cli,
    run_layerprobe,
)
from layerprobe.reference import LayerprobeForCausalLM, reference_config
from layerprobe.training import checkpoint as ckpt
from layerprobe.corpus import step_rows
from layerprobe.training.trainer import Plan, TrainSettings, init_model, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- schedule, data order, initial weights ------------------------------------------------------------------


def plan_for(steps=100, warmup_ratio=0.1, lr=1e-3, min_lr_ratio=0.1) -> Plan:
    s = TrainSettings(warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
    return Plan(schemes=["pre"], preset="micro", steps=steps, seq_len=8, batch_size=2, micro_batch_size=2, accum=1,
                lr=lr, warmup_steps=int(warmup_ratio * steps), eval_every=10, save_every=10, vocab_size=300,
                data_seed=0, autocast_dtype=None, settings=s)


def test_lr_warms_up_linearly_then_cosine_decays_to_ten_percent():
    p = plan_for(steps=100)
    lrs = [lr_at(i, p) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10 warmup steps
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    mid = 10 + 45  # halfway through the cosine: halfway between peak and floor
    assert lrs[mid] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), rel=1e-9)
    assert lr_at(100, p) == pytest.approx(1e-4)  # the floor: 10% of the peak


def test_batch_order_is_a_function_of_step_and_seed():
    def rows(step, seed=3):
        return step_rows(step, n_blocks=10, batch_size=4, seed=seed).tolist()

    seq_a = [rows(s) for s in range(6)]
    seq_b = [rows(s) for s in reversed(range(6))][::-1]  # asked in another order
    assert seq_a == seq_b
    flat = sum(seq_a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert flat[:10] != flat[10:20]  # each epoch reshuffled
    assert rows(0, seed=4) != seq_a[0]


def test_every_scheme_starts_from_the_same_weights():
    states = {s: init_model(reference_config("micro", s), seed=7).state_dict() for s in ("pre", "post", "mix", "lns")}
    ref = states["pre"]
    for scheme, sd in states.items():
        assert sd.keys() == ref.keys(), scheme
        assert all(torch.equal(sd[k], ref[k]) for k in ref), scheme
    other_seed = init_model(reference_config("micro", "pre"), seed=8).state_dict()
    assert not torch.equal(other_seed["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


# ---- per-layer statistics: the definitions analyze uses, checked with plain loops ----------------------------

def _plain_variance(values: list[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values) / len(values)


def test_layer_statistics_match_plain_loops():
    """Held-out loss, output variance (population variance over samples, positions and units, as analyze's),
    token variance, and per-layer and total gradient norms (before clipping) against loops over layers/tokens."""
    from layerprobe.training.distributed import DistEnv
    from layerprobe.monitor import LayerMonitor
    from layerprobe.training.layer_stats import clip_gradients, evaluate

    model = init_model(reference_config("micro", "pre"), seed=3)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, model.config.vocab_size, (3, 12), generator=g)
    env = DistEnv()
    stats = evaluate(model, blocks, micro_batch_size=2, env=env)  # a full and a partial micro-batch

    outputs = {i: [] for i in range(len(model.model.layers))}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple) else out))
               for i, layer in enumerate(model.model.layers)]
    nll = []
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None], use_cache=False).logits[0].double()
            for t in range(len(block) - 1):
                row = logits[t].tolist()
                top = max(row)
                log_z = top + math.log(math.fsum(math.exp(x - top) for x in row))
                nll.append(log_z - row[int(block[t + 1])])
    for h in handles:
        h.remove()
    assert stats.loss == pytest.approx(math.fsum(nll) / len(nll), rel=1e-6)
    for layer, outs in outputs.items():
        tokens = [vec.tolist() for out in outs for vec in out.reshape(-1, out.shape[-1])]
        assert len(tokens) == 3 * 12
        population = _plain_variance([x for vec in tokens for x in vec])
        per_token = math.fsum(_plain_variance(vec) for vec in tokens) / len(tokens)
        assert stats.output_variance[layer] == pytest.approx(population, rel=1e-6), layer
        assert stats.token_variance[layer] == pytest.approx(per_token, rel=1e-6), layer
        assert population >= per_token  # the spread between tokens' means is the difference

    model.zero_grad()
    model(input_ids=blocks, labels=blocks, use_cache=False).loss.backward()
    # train-reference's gradient norms are the monitor's: a recorded step and a step that records nothing.
    monitor = LayerMonitor(model, every=10)
    monitor.after_backward(record=True)
    total = monitor.grad_norm()
    per_layer = monitor.after_step()["layer_grad_norm"]

    def plain_norm(params):
        return math.sqrt(math.fsum(x * x for p in params for x in p.grad.flatten().tolist()))

    assert total == pytest.approx(plain_norm(model.parameters()), rel=1e-6)
    assert per_layer == pytest.approx([plain_norm(layer.parameters()) for layer in model.model.layers], rel=1e-6)
    monitor.after_backward()
    assert monitor.grad_norm() == total and monitor.after_step() is None

    def norm_now():
        m = LayerMonitor(model)
        m.after_backward(record=False)
        return m.grad_norm()

    # Clipping uses the norm already measured: afterwards the gradients' norm is the limit.
    before = [p.grad.clone() for p in model.parameters()]
    clip_gradients(model, total, max_norm=total / 4)
    assert norm_now() == pytest.approx(total / 4, rel=1e-5)
    assert all(torch.allclose(p.grad, b / 4, rtol=1e-5) for p, b in zip(model.parameters(), before))
    clip_gradients(model, total / 4, max_norm=total)  # under the limit: untouched
    assert all(torch.allclose(p.grad, b / 4, rtol=1e-5) for p, b in zip(model.parameters(), before))


def _evaluate_in_process(rank: int, world: int, port: int, out) -> None:
    """One of `world` gloo processes: evaluate on 5 held-out blocks (shares of 3 and 2), rank 0 saves the stats."""
    import json
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from layerprobe.training.distributed import DistEnv
    from layerprobe.training.layer_stats import evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        model = init_model(reference_config("micro", "mix"), seed=11)
        blocks = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(4))
        stats = evaluate(model, blocks, micro_batch_size=2, env=DistEnv(rank=rank, world_size=world))
        if rank == 0:
            out.write_text(json.dumps([stats.loss, stats.output_variance, stats.token_variance]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_held_out_statistics_of_uneven_shares_over_two_processes_equal_one_process(tmp_path):
    """5 blocks over 2 processes (3 + 2): every process must describe the same packed collective, and the
    sums over both shares give one process's numbers."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _evaluate_in_process(0, 1, port, tmp_path / "one.json")
    mp.spawn(_evaluate_in_process, args=(2, port + 1 if port < 65535 else port - 1, tmp_path / "two.json"),
             nprocs=2, join=True)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two[0] == pytest.approx(one[0], rel=1e-6)  # float32 loss sums of other micro-batches
    for a, b in zip(one[1:], two[1:]):
        np.testing.assert_allclose(b, a, rtol=1e-9)


def test_held_out_variances_come_from_the_capture_and_equal_float64_over_the_layer_outputs():
    """train-reference's held-out statistics run on the monitor's capture (analyze's code): over several
    micro-batches, each layer's output variance and mean token variance equal float64 reductions of the
    layers' outputs (1e-6); the capture sums token variance only when asked (analyze's columns unchanged)."""
    from layerprobe.anatomy import find_anatomy
    from layerprobe.capture import LayerCapture
    from layerprobe.training.distributed import DistEnv
    from layerprobe.training.layer_stats import evaluate

    model = init_model(reference_config("micro", "mix"), seed=11)
    blocks = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(4))
    stats = evaluate(model, blocks, micro_batch_size=2, env=DistEnv())  # forwards of 2, 2 and 1 samples
    assert model.training  # handed back in the mode it came in

    outputs = {i: [] for i in range(len(model.model.layers))}

    def keep(index):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            outputs[index].append(h.detach().double().reshape(-1, h.shape[-1]))  # one row per token
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    model.eval()
    with torch.no_grad():
        model(input_ids=blocks, use_cache=False)
    for h in handles:
        h.remove()
    for layer, outs in outputs.items():
        rows = torch.cat(outs)
        assert rows.shape[0] == 5 * 16
        mean = rows.sum() / rows.numel()
        population = (((rows - mean) ** 2).sum() / rows.numel()).item()
        per_token = (((rows - rows.mean(-1, keepdim=True)) ** 2).mean(-1)).mean().item()
        assert stats.output_variance[layer] == pytest.approx(population, rel=1e-6, abs=0), layer
        assert stats.token_variance[layer] == pytest.approx(per_token, rel=1e-6, abs=0), layer
    assert stats.token_variance != stats.output_variance

    with LayerCapture(find_anatomy(model), metrics={"variance"}) as plain:
        with torch.no_grad():
            model(input_ids=blocks, use_cache=False)
        plain.end_batch()
    assert set(plain.per_layer()) == {"output_variance", "update_variance"}


def test_block_batches_split_the_global_batch_over_processes():
    from layerprobe.training.data import BatchSource, BlockBatches

    blocks = torch.arange(10 * 3).reshape(10, 3)
    source = BlockBatches(blocks, batch_size=4, seed=5)
    assert isinstance(source, BatchSource)
    for step in (0, 1, 7):
        whole = source.batch(step)
        assert torch.equal(whole, blocks[step_rows(step, n_blocks=10, batch_size=4, seed=5)])
        assert torch.equal(torch.cat([source.batch(step, r, 2) for r in range(2)]), whole)
        assert torch.equal(torch.cat([source.batch(step, r, 4) for r in range(4)]), whole)


def test_recover_finishes_a_swap_cut_short(tmp_path):
    run = tmp_path / "run"
    (run / ".last.old").mkdir(parents=True)  # crash after `last` moved aside, before the new one moved in
    (run / ".last.old" / "x").write_text("old")
    (run / ".best.tmp-123").mkdir()  # a half-written checkpoint
    ckpt.recover(run)
    assert (run / "last" / "x").read_text() == "old"
    assert not (run / ".last.old").exists() and not (run / ".best.tmp-123").exists()


# ---- an end-to-end run, in process --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre,LNS", "--steps", 8, "--eval-every", 4,
                           "--out", out)
    assert result.exit_code == 0, text
    return out, text


def test_each_run_is_a_hugging_face_checkpoint(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, text = trained
    assert "pre" in text and "lns" in text
    for scheme in ("pre", "lns"):
        run = out / scheme
        model = AutoModelForCausalLM.from_pretrained(run)
        assert type(model) is LayerprobeForCausalLM and model.config.norm_scheme == scheme
        tok = AutoTokenizer.from_pretrained(run)
        assert len(tok) == model.config.vocab_size == 384
        assert tok.decode(tok("def f(x): return x")["input_ids"]) == "def f(x): return x"
        # The top-level model is last/'s, best/ is a model of its own, last/ has what resuming needs.
        assert (run / "model.safetensors").read_bytes() == (run / "last" / "model.safetensors").read_bytes()
        assert AutoModelForCausalLM.from_pretrained(run / "best").config.norm_scheme == scheme
        state = torch.load(run / "last" / "trainer_state.pt", weights_only=True)
        assert state["step"] == 8 and "optimizer" in state and "torch_rng" in state
        record = read_json(run / "run.json")
        assert record["status"] == "completed" and record["step"] == 8 and record["checkpoint_step"] == 8
        assert not list(run.glob(".*tmp*"))  # no temporaries left behind
    summary = read_json(out / "summary.json")
    assert [r["scheme"] for r in summary["runs"]] == ["pre", "lns"]


def test_metrics_every_step_and_layer_statistics_every_k_steps(trained):
    out, _ = trained
    records = read_metrics(out / "lns")
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens"] == r["step"] * 8 * 32
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
        assert len(r["layer_grad_norm"]) == len(r["layer_output_var"]) == 4
        assert all(g > 0 for g in r["layer_grad_norm"]) and all(v > 0 for v in r["layer_output_var"])
        assert len(r["layer_token_var"]) == 4 and all(0 < t <= v for t, v in zip(r["layer_token_var"], r["layer_output_var"]))
        # Per-layer and total norms are taken from the same gradients, before clipping.
        assert math.fsum(g * g for g in r["layer_grad_norm"]) <= r["grad_norm"] ** 2
    # Pre-LN: the residual stream's variance grows with depth at initialisation and early in training.
    assert read_metrics(out / "pre")[-1]["layer_output_var"][-1] > read_metrics(out / "pre")[-1]["layer_output_var"][0]
    best = read_json(out / "lns" / "run.json")["best_eval_loss"]
    assert best == min(r["eval_loss"] for r in evals)


def test_analyze_reads_a_run_folder(trained, tmp_path):
    out, _ = trained
    result, text = run_cli("analyze", out / "mix" if (out / "mix").exists() else out / "lns", "--samples", 2,
                           "--seq-len", 16, "--batch-size", 2, "--quiet", "--out", tmp_path / "report")
    assert result.exit_code == 0, text
    assert (tmp_path / "report" / "manifest.json").is_file()


def test_position_in_the_scheme_list_changes_nothing(trained, tmp_path):
    """Same data order and seed for every scheme: lns alone trains exactly as lns after pre."""
    out, _ = trained
    result, text = run_cli("train-reference", *MICRO, "--norm", "lns", "--steps", 8, "--eval-every", 4,
                           "--out", tmp_path)
    assert result.exit_code == 0, text
    assert comparable(read_metrics(tmp_path / "lns")) == comparable(read_metrics(out / "lns"))


def test_named_tokenizer_and_token_id_data(trained, tmp_path):
    out, _ = trained
    result, text = run_cli("train-reference", *MICRO, "--norm", "DeepNorm,Peri-LN", "--steps", 2,
                           "--tokenizer", out / "pre", "--out", tmp_path / "a")
    assert result.exit_code == 0, text
    for scheme in ("deepnorm", "sandwich"):
        config = read_json(tmp_path / "a" / scheme / "config.json")
        assert config["vocab_size"] == 384 and config["norm_scheme"] == scheme
        assert read_json(tmp_path / "a" / scheme / "run.json")["status"] == "completed"

    ids = np.random.default_rng(0).integers(0, 300, size=(40, 33))
    np.save(tmp_path / "ids.npy", ids)
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", 2, "--data", tmp_path / "ids.npy",
                           "--vocab-size", 300, "--out", tmp_path / "b")
    assert result.exit_code == 0, text
    assert read_json(tmp_path / "b" / "pre" / "config.json")["vocab_size"] == 300


# ---- bad input: one line, non-zero exit, no traceback -------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--norm", "pre,layernorm"], "unknown norm scheme 'layernorm'"),
    (["--preset", "7b"], "unknown preset '7b'"),
    (["--post-ln-ratio", "-0.5"], "[0, 1]"),
    (["--alpha", "1.5"], "[0, 1]"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_bad_options(tmp_path, args, needle):
    result, text = run_cli("train-reference", *MICRO, "--steps", 2, "--out", tmp_path, *args)
    assert_one_line_error(result, text, needle)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_data_too_small_for_one_batch(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus. " * 40)
    result, text = run_cli("train-reference", *MICRO, "--steps", 2, "--data", small, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "one batch of 8")


def test_a_folder_holding_another_run_is_refused_unless_resume_or_overwrite(tmp_path):
    base = ["train-reference", *MICRO, "--norm", "pre", "--steps", 2, "--out", tmp_path]
    assert run_cli(*base)[0].exit_code == 0
    result, text = run_cli(*base, "--lr", "0.01")
    assert_one_line_error(result, text, "different config", "lr 0.003 -> 0.01", "--overwrite")
    result, text = run_cli(*base, "--lr", "0.01", "--resume")
    assert_one_line_error(result, text, "different config")
    result, text = run_cli(*base)
    assert_one_line_error(result, text, "already holds this run", "--resume")
    result, text = run_cli(*base, "--resume")  # complete already: nothing to do, not an error
    assert result.exit_code == 0, text
    result, text = run_cli(*base, "--lr", "0.01", "--overwrite")
    assert result.exit_code == 0, text
    assert read_json(tmp_path / "pre" / "run.json")["identity"]["train"]["lr"] == 0.01


# ---- faults -------------------------------------------------------------------------------------------------

@pytest.mark.slow  # each of these three starts child processes: a real SIGKILL, a real Ctrl-C, torchrun
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """4 steps, a real SIGKILL (after step 5 was logged, so step 5 is redone), resume for 4 more == 8 in one go."""
    args = ["train-reference", *MICRO, "--norm", "mix", "--steps", 8, "--save-every", 4, "--eval-every", 2]
    whole = run_layerprobe([*args, "--out", tmp_path / "whole"])
    assert whole.returncode == 0, whole.stderr
    killed = run_layerprobe([*args, "--out", tmp_path / "cut"], kill_after_step=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cut = tmp_path / "cut" / "mix"
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4, 5]
    assert torch.load(cut / "last" / "trainer_state.pt", weights_only=True)["step"] == 4
    resumed = run_layerprobe([*args, "--out", tmp_path / "cut", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_metrics(cut)) == comparable(read_metrics(tmp_path / "whole" / "mix"))
    from safetensors.torch import load_file

    a, b = load_file(cut / "model.safetensors"), load_file(tmp_path / "whole" / "mix" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    args = ["train-reference", *MICRO, "--norm", "pre", "--steps", 300, "--save-every", 1000, "--out", tmp_path]
    proc = subprocess.Popen([sys.executable, "-m", "layerprobe", *map(str, args)], env=env_single_thread(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr + stdout
    assert "interrupted" in stderr and "--resume" in stderr
    record = read_json(tmp_path / "pre" / "run.json")
    k = record["step"]
    assert record["status"] == "interrupted" and 3 <= k < 300
    assert torch.load(tmp_path / "pre" / "last" / "trainer_state.pt", weights_only=True)["step"] == k
    assert [r["step"] for r in read_metrics(tmp_path / "pre")] == list(range(1, k + 1))
    resumed = run_layerprobe([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "pre")] == list(range(1, 301))


def test_a_diverging_scheme_stops_and_the_others_go_on(tmp_path, monkeypatch):
    """Post-LN's loss turns NaN at step 3: it stops there, keeps the step-2 checkpoint; pre trains on."""
    forward = LayerprobeForCausalLM.forward
    calls = {"post": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and self.config.norm_scheme == "post":
            calls["post"] += 1
            if calls["post"] >= 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LayerprobeForCausalLM, "forward", poisoned)
    result, text = run_cli("train-reference", *MICRO, "--norm", "post,pre", "--steps", 6, "--save-every", 2,
                           "--out", tmp_path)
    assert result.exit_code == 0, text
    assert "diverged@3" in text and "diverged at step 3" in text
    post = read_json(tmp_path / "post" / "run.json")
    assert post["status"] == "diverged" and post["diverged_at"] == 3 and post["checkpoint_step"] == 2
    assert "nan" in post["diverged_reason"]
    assert torch.load(tmp_path / "post" / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert read_metrics(tmp_path / "post")[-1] == {"step": 3, "loss": None, "lr": lr_at(2, plan_for(6, 0.1, 0.003)),
                                                   "grad_norm": None, "diverged": True,
                                                   "reason": post["diverged_reason"]}
    pre = read_json(tmp_path / "pre" / "run.json")
    assert pre["status"] == "completed" and pre["step"] == 6
    summary = read_json(tmp_path / "summary.json")
    assert [(r["scheme"], r["status"], r["diverged_at"]) for r in summary["runs"]] == [
        ("post", "diverged", 3), ("pre", "completed", None)]


def test_a_real_divergence_keeps_the_last_good_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", 20, "--lr", "1e6",
                           "--grad-clip", 0, "--save-every", 1, "--out", tmp_path)
    assert result.exit_code == 0, text
    record = read_json(tmp_path / "pre" / "run.json")
    assert record["status"] == "diverged" and record["diverged_at"] is not None
    assert record["checkpoint_step"] == record["diverged_at"] - 1 >= 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pre")  # the last good weights load
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- data parallel ------------------------------------------------------------------------------------------

def torchrun(args, nproc=2):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "-m", "layerprobe", *map(str, args)],
        env=env_single_thread(), cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_match_one_process_at_the_same_global_batch(tmp_path):
    # Gradient norms here are ~0.55: a clip at 0.1 scales every step, so clipping is checked across processes too.
    args = ["train-reference", *MICRO, "--norm", "mix", "--steps", 5, "--batch-size", 8, "--eval-every", 5,
            "--grad-clip", 0.1]
    single = run_layerprobe([*args, "--out", tmp_path / "one"])
    assert single.returncode == 0, single.stderr
    one = read_metrics(tmp_path / "one" / "mix")
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        proc = torchrun([*args, *extra, "--out", tmp_path / name])
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        two = read_metrics(tmp_path / name / "mix")
        assert len(one) == len(two) == 5
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), name
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), name
            assert b["lr"] == a["lr"] and b["tokens"] == a["tokens"]
        assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5), name
        assert two[-1]["layer_grad_norm"] == pytest.approx(one[-1]["layer_grad_norm"], rel=1e-4), name
        for key in ("layer_output_var", "layer_token_var"):  # the held-out capture's sums, reduced over processes
            assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-5), (name, key)
        assert read_json(tmp_path / name / "mix" / "run.json")["world_size"] == 2
        # The checkpoint is whole (gathered from the shards under FSDP) and equals the single-process one.
        from safetensors.torch import load_file

        w1, w2 = load_file(tmp_path / "one" / "mix" / "model.safetensors"), load_file(tmp_path / name / "mix" / "model.safetensors")
        assert w1.keys() == w2.keys()
        assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6) for k in w1), name
