"""`train_reference`: train one reference model per norm scheme, with the same data order and seed.

Recipe (the Mix-LN / Curse-of-Depth papers'): AdamW (Adam when weight decay is 0), cosine schedule with
linear warmup decaying to 10% of the peak, optional gradient clipping, gradient accumulation, bf16
autocast and optional torch.compile on GPU. Run it under `torchrun` for DDP (or FSDP with --fsdp).

Everything a step does is a function of the step number and the saved state (weights, optimizer, RNG),
so a run killed at any point and resumed from its last checkpoint logs the same losses as one that
never stopped.

The parts, in the order a run uses them: `settings` (what a run is, validated into a `Plan`), `data`
(token blocks and the `BatchSource` each step reads), `model` (weights and wrappers), `schedule` (the
learning rate), `layer_stats` (held-out loss and per-layer variance), `layerprobe.monitor.LayerMonitor`
(gradient norms per layer and sublayer before clipping, the clip factor, weight-update sizes), `checkpoint`
(atomic run folders), `signals` (Ctrl-C), and this module: the loop.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import LayerprobeError
from ..io import ensure_writable_dir, write_json
from ..metrics.loss import perplexity
from ..progress import make_progress
from ..reference import LayerprobeConfig, LayerprobeForCausalLM
from . import checkpoint as ckpt
from .data import BatchSource, BlockBatches, TokenData, load_token_data
from .distributed import (DistEnv, all_reduce_sum, any_process, barrier, init_distributed, main_first, shutdown,
                          wrap_ddp, wrap_fsdp)
from ..monitor import LayerMonitor
from .layer_stats import clip_gradients, evaluate
from .model import autocast, init_model
from .schedule import lr_at
from .settings import (
    MODEL_KEYS,
    Plan,
    TrainSettings,
    identity_differences,
    shape_departures,
    model_config,
    parse_schemes,
    resolve_plan,
    run_identity,
)
from .health import nonfinite_statistic, stuck_reason
from .signals import StopFlag
from .summary import RunResult, TrainingSummary
from ..corpus.vocab import check_tokenizer_spec, fingerprint as tokenizer_fingerprint

__all__ = ["MODEL_KEYS", "Plan", "Run", "RunResult", "StopFlag", "TrainSettings", "TrainingSummary",
           "identity_differences", "init_model", "lr_at", "model_config", "parse_schemes", "resolve_plan",
           "run_identity", "train_reference"]


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


@dataclass
class Tally:
    """Where a run stands: carried in the checkpoint, so a resumed run counts on from where it stopped."""

    step: int = 0
    seconds: float = 0.0  # training time, summed over every session of the run
    tokens: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    first_loss: float | None = None  # step 1's training loss, before any update: a stuck run never goes below it

    def state(self) -> dict:
        return {"best_eval_loss": self.best_loss, "best_step": self.best_step, "train_seconds": self.seconds,
                "tokens": self.tokens, "first_loss": self.first_loss}


# ---- one run ----------------------------------------------------------------------------------------------

class Run:
    """One scheme's training run inside OUT/<scheme>."""

    def __init__(self, plan: Plan, scheme: str, config: LayerprobeConfig, identity: dict, tokenizer,
                 data: TokenData, env: DistEnv, out: Path):
        self.plan, self.scheme, self.config, self.identity = plan, scheme, config, identity
        self.tokenizer, self.data, self.env = tokenizer, data, env
        self.dir = out / plan.run_name(scheme)
        self.state: dict | None = None  # trainer state to resume from
        self.skip = False  # already complete

    # -- folder checks, done for every scheme before any training starts --
    def check_folder(self) -> None:
        s = self.plan.settings
        if self.dir.exists() and not self.dir.is_dir():
            raise LayerprobeError(f"{self.dir} is a file, where this run's folder would go",
                                  advice="remove it or choose another {out}")
        if self.env.is_main:
            ckpt.recover(self.dir)
        if not self.dir.exists() or not any(self.dir.iterdir()):
            return
        record = ckpt.read_run(self.dir)
        if record is None:
            raise LayerprobeError(f"{self.dir} exists and is not a layerprobe run folder",
                                  advice="remove it or choose another {out}")
        if s.overwrite:
            return
        diffs = identity_differences(record.get("identity", {}), self.identity)
        if diffs:
            shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
            raise LayerprobeError(f"{self.dir} holds a run with a different config ({shown})",
                                  advice="pass {overwrite} to replace it or choose another {out}")
        if not s.resume:
            raise LayerprobeError(f"{self.dir} already holds this run (step {record.get('step', 0)} of "
                                  f"{record.get('total_steps', '?')})",
                                  advice="pass {resume} to continue it or {overwrite} to start again")
        ckpt.check_resumable(self.dir)  # a damaged checkpoint is refused before any run.json changes

    def prepare(self) -> None:
        """After the checks: clear for --overwrite, or load the state to resume from (every process)."""
        s = self.plan.settings
        if s.overwrite:
            main_first(self.env, lambda: shutil.rmtree(self.dir) if self.dir.exists() else None)
        if s.resume and self.dir.exists():
            self.state = ckpt.load_state(self.dir)
            done = self.state["step"] if self.state else 0
            record = ckpt.read_run(self.dir) or {}
            if self.state and done >= self.plan.steps:
                self.skip = True
                self.result_from_record(record, done)

    def result_from_record(self, record: dict, done: int) -> None:
        self.result = RunResult(
            scheme=self.scheme, path=str(self.dir), status=record.get("status", "completed"), steps_done=done,
            total_steps=self.plan.steps, final_loss=record.get("final_loss"),
            final_eval_loss=record.get("final_eval_loss"), final_eval_ppl=record.get("final_eval_ppl"),
            best_eval_loss=record.get("best_eval_loss"), best_step=record.get("best_step"),
            diverged_at=record.get("diverged_at"), diverged_reason=record.get("diverged_reason"),
            checkpoint_step=record.get("checkpoint_step"),
            layer_output_var=record.get("layer_output_var"), seconds=record.get("seconds", 0.0),
            tokens_per_s=record.get("tokens_per_s"),
        )

    def _record(self, result: RunResult, step: int) -> dict:
        return {"scheme": self.scheme, "status": result.status, "step": step, "total_steps": self.plan.steps,
                "final_loss": result.final_loss, "final_eval_loss": result.final_eval_loss,
                "final_eval_ppl": result.final_eval_ppl, "best_eval_loss": result.best_eval_loss,
                "best_step": result.best_step, "diverged_at": result.diverged_at,
                "diverged_reason": result.diverged_reason, "checkpoint_step": result.checkpoint_step,
                "layer_output_var": result.layer_output_var,
                "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "identity": self.identity, "preset": self.plan.preset,
                # empty: the preset's (a paper's) model; else how this one differs, e.g. an aligned FFN
                "differs_from_preset": shape_departures(self.plan.preset, self.config),
                "settings": {k: v for k, v in asdict(self.plan.settings).items() if k not in ("resume", "overwrite")},
                "world_size": self.env.world_size}

    def _build_model(self) -> LayerprobeForCausalLM:
        model = init_model(self.config, self.plan.settings.seed)
        if self.state is not None:
            from safetensors.torch import load_file

            path = self.dir / "last" / ckpt.WEIGHTS_FILE
            try:
                weights = load_file(str(path))
            except Exception as e:
                raise ckpt.damaged_checkpoint_error(self.dir, path, str(e).strip()[:160], unchanged=False) from None
            missing, unexpected = model.load_state_dict(weights, strict=False)
            missing = [k for k in missing if not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
            if missing or unexpected:
                raise LayerprobeError(f"the checkpoint in {self.dir / 'last'} does not match the model "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use --overwrite")
        return model.to(self.env.device)

    def _full_state_dicts(self, model, opt) -> tuple[dict | None, dict]:
        """Model and optimizer state in a form that any world size can load."""
        if not self.plan.settings.fsdp:
            return None, opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)

    def _save_last(self, core, model, opt, step: int, result: RunResult, extra: dict) -> None:
        model_sd, opt_sd = self._full_state_dicts(model, opt)

        def save():
            state = {"step": step, "optimizer": opt_sd, "torch_rng": torch.get_rng_state(), **extra}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            last = ckpt.save_checkpoint(self.dir, "last", core, self.tokenizer, state=state, state_dict=model_sd)
            ckpt.publish_top_level(self.dir, last)
            ckpt.write_run(self.dir, self._record(result, step))

        main_first(self.env, save)  # a full disk on the main process stops every process, not just it

    def _save_best(self, core, model) -> None:
        model_sd = None
        if self.plan.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        main_first(self.env, lambda: ckpt.save_checkpoint(self.dir, "best", core, self.tokenizer, state_dict=model_sd))

    def _setup(self):
        """The model (wrapped for DDP/FSDP, compiled if asked) and its optimizer, restored when resuming."""
        plan, env, s = self.plan, self.env, self.plan.settings
        core = self._build_model()
        core.train()
        model = core
        if s.fsdp:
            model = wrap_fsdp(core, env, mixed_bf16=plan.autocast_dtype is not None)
        elif env.distributed:
            model = wrap_ddp(core, env)
        # Weight decay (0 by default, i.e. Adam) applies to matrices only, never to norms.
        decay = [p for p in core.parameters() if p.dim() >= 2]
        no_decay = [p for p in core.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.999), eps=1e-8)
        if self.state is not None:
            if s.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(model, opt, optim_state_dict=self.state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(self.state["optimizer"])
            torch.set_rng_state(self.state["torch_rng"])
            if "cuda_rng" in self.state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self.state["cuda_rng"])
        step_model = torch.compile(model) if s.compile else model
        return core, model, step_model, opt

    def _start(self) -> tuple[Tally, RunResult]:
        """The folder, the tallies and the result to continue from (step 0 for a fresh run)."""
        plan, env, s = self.plan, self.env, self.plan.settings
        main_first(env, lambda: self.dir.mkdir(parents=True, exist_ok=True))
        state = self.state or {}
        tally = Tally(step=state.get("step", 0), seconds=state.get("train_seconds", 0.0),
                      tokens=state.get("tokens", 0), best_loss=state.get("best_eval_loss"),
                      best_step=state.get("best_step"), first_loss=state.get("first_loss"))
        if tally.first_loss is None and tally.step > 0:  # a checkpoint from before first_loss was kept
            first = [r.get("loss") for r in ckpt.read_metrics(self.dir) if r.get("step") == 1]
            tally.first_loss = first[0] if first and isinstance(first[0], float) else None
        result = RunResult(scheme=self.scheme, path=str(self.dir), status="running", steps_done=tally.step,
                           total_steps=plan.steps, resumed_from=tally.step if s.resume and self.state else None,
                           checkpoint_step=tally.step if self.state else None)
        if self.state is not None:
            old = ckpt.read_run(self.dir) or {}
            for key in ("final_loss", "final_eval_loss", "final_eval_ppl", "layer_output_var"):
                setattr(result, key, old.get(key))
            result.best_eval_loss, result.best_step = tally.best_loss, tally.best_step
        def restart_record():
            ckpt.truncate_metrics(self.dir, tally.step)  # steps after the checkpoint are redone: their metrics go
            ckpt.write_run(self.dir, self._record(result, tally.step))

        main_first(env, restart_record)
        return tally, result

    def _step(self, step: int, batches: BatchSource, model, step_model, opt):
        """Forward and backward over the micro-batches of one global batch; returns (lr, loss). Neither
        measures, clips nor steps the optimizer: the caller does, through the monitor."""
        plan, env, s = self.plan, self.env, self.plan.settings
        lr = lr_at(step, plan)
        for group in opt.param_groups:
            group["lr"] = lr
        rows = batches.batch(step, env.rank, env.world_size)
        loss_acc = torch.zeros((), dtype=torch.float64, device=env.device)
        for m in range(plan.accum):
            ids = rows[m * plan.micro_batch_size:(m + 1) * plan.micro_batch_size].to(env.device)
            with self._sync(model, m == plan.accum - 1), autocast(plan.autocast_dtype, env.device):
                loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / plan.accum).backward()
            loss_acc += loss.detach().double()
        # Every micro-batch holds the same number of tokens, so the mean of the means is the batch mean.
        loss_val = (all_reduce_sum(env, (loss_acc / plan.accum).reshape(1).cpu()) / env.world_size).item()
        return lr, loss_val

    def _evaluate(self, eval_model, eval_blocks, tally: Tally, result: RunResult, core, model) -> dict:
        """Held-out loss and per-layer statistics; keeps best/ when the loss is the lowest so far."""
        stats = evaluate(eval_model, eval_blocks, self.plan.micro_batch_size, self.env, self.plan.autocast_dtype)
        ppl = perplexity(stats.loss)
        result.final_eval_loss, result.final_eval_ppl = stats.loss, ppl
        result.layer_output_var = stats.output_variance
        if _finite(stats.loss) and (tally.best_loss is None or stats.loss < tally.best_loss):
            tally.best_loss, tally.best_step = stats.loss, tally.step
            self._save_best(core, model)
        result.best_eval_loss, result.best_step = tally.best_loss, tally.best_step
        return {"eval_loss": stats.loss, "eval_ppl": ppl, "layer_output_var": stats.output_variance,
                "layer_token_var": stats.token_variance}

    def _diverged(self, result: RunResult, step: int, lr: float, loss: float, gnorm: float) -> dict:
        """Record a NaN/Inf loss or gradient norm at `step`; returns the metrics line that says so."""
        result.status, result.diverged_at = "diverged", step + 1
        result.diverged_reason = f"loss is {loss}" if not _finite(loss) else f"gradient norm is {gnorm}"
        return {"step": step + 1, "loss": None, "lr": lr, "grad_norm": None, "diverged": True,
                "reason": result.diverged_reason}

    def train(self, stop: StopFlag, progress) -> RunResult:
        plan, env, s = self.plan, self.env, self.plan.settings
        # Where to start: step 0, or the checkpoint's step with its tallies (later metrics lines are dropped).
        tally, result = self._start()
        seconds_before, tokens_before = tally.seconds, tally.tokens
        # The model and optimizer (restored when resuming) and the batches, a pure function of the step.
        core, model, step_model, opt = self._setup()
        batches = BlockBatches(self.data.train, plan.batch_size, plan.data_seed)
        eval_blocks = self.data.eval[: (len(self.data.eval) // env.world_size) * env.world_size]
        eval_model = model if s.fsdp else core  # FSDP's forward needs its wrapper; DDP's does not
        tokens_per_step = plan.batch_size * plan.seq_len
        # The per-layer statistics of a training step: the monitor any loop can use, recording on the
        # evaluation steps (told each step, as the last step is one too); its rows join this log's lines.
        monitor = LayerMonitor(model, every=plan.eval_every, step=tally.step)
        task = progress.add_task(self.dir.name, total=plan.steps, completed=tally.step, info="")

        def save_last():
            self._save_last(core, model, opt, tally.step, result, tally.state())
            result.checkpoint_step = tally.step

        with ckpt.MetricsLog(self.dir, enabled=env.is_main) as log:
            while tally.step < plan.steps:
                # Every process stops at the same step, or the next step's collectives would wait forever.
                if any_process(env, stop.requested):
                    result.status = "interrupted"
                    break
                t0, step = time.perf_counter(), tally.step
                is_eval_step = (step + 1) % plan.eval_every == 0 or step + 1 == plan.steps
                lr, loss = self._step(step, batches, model, step_model, opt)
                monitor.after_backward(max_norm=s.grad_clip if s.grad_clip > 0 else None, record=is_eval_step)
                gnorm = monitor.grad_norm()  # before clipping
                if not (_finite(loss) and _finite(gnorm)):
                    # Stop before the update: the last checkpoint on disk is the last good state.
                    log.write(self._diverged(result, step, lr, loss, gnorm))
                    break
                # Clip with the norm just measured (and logged), then update.
                clip_gradients(model, gnorm, s.grad_clip)
                opt.step()
                layer_row = monitor.after_step()  # gradient norms per layer/sublayer, clip factor, update sizes
                opt.zero_grad(set_to_none=True)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()  # so the step's time is the GPU's, not the launch's
                dt = time.perf_counter() - t0
                tally.seconds, tally.tokens, tally.step = tally.seconds + dt, tally.tokens + tokens_per_step, step + 1
                if step == 0:
                    tally.first_loss = loss
                record = {"step": tally.step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                          "tokens_per_s": tokens_per_step / dt, "tokens": tally.tokens}
                result.final_loss, result.steps_done = loss, tally.step
                if is_eval_step:
                    record.update({k: v for k, v in layer_row.items() if k not in record})
                    record.update(self._evaluate(eval_model, eval_blocks, tally, result, core, model))
                    blown_up = nonfinite_statistic(record)
                    if blown_up:
                        # The loss is finite but the model is not: stop before this state becomes the checkpoint.
                        result.status, result.diverged_at, result.diverged_reason = "diverged", tally.step, blown_up
                        log.write(dict(record, diverged=True, reason=blown_up))
                        break
                log.write(record)  # before the checkpoint: a checkpoint never runs ahead of its metrics
                _after_step(self.dir, tally.step)
                if tally.step % plan.save_every == 0 or tally.step == plan.steps:
                    save_last()
                ppl = f" · eval ppl {result.final_eval_ppl:.1f}" if result.final_eval_ppl else ""
                progress.update(task, completed=tally.step,
                                info=f"loss {loss:.3f} · {tokens_per_step / dt:,.0f} tok/s{ppl}")
            else:
                stuck = stuck_reason(tally.first_loss, tally.best_loss, tally.step)
                result.status = "diverged" if stuck else "completed"
                if stuck:
                    result.diverged_at, result.diverged_reason = tally.step, stuck
            if result.status == "interrupted" and tally.step != result.checkpoint_step:
                save_last()
        # run.json and the summary report totals over this session and any before it.
        result.seconds = tally.seconds
        result.tokens_per_s = ((tally.tokens - tokens_before) / (tally.seconds - seconds_before)
                               if tally.seconds > seconds_before else None)
        main_first(env, lambda: ckpt.write_run(self.dir, self._record(result, result.checkpoint_step or 0)))
        return result

    @staticmethod
    def _sync(model, last_micro: bool):
        """Gradient all-reduce only on the last micro-batch of an accumulation."""
        if last_micro:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):  # DDP
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(False)

            @contextlib.contextmanager
            def resync():
                try:
                    yield
                finally:
                    model.set_requires_gradient_sync(True)
            return resync()
        return contextlib.nullcontext()


def _after_step(run_dir: Path, step: int) -> None:
    """Called after each step's metrics are written; a seam for fault-injection tests."""


# ---- all schemes ------------------------------------------------------------------------------------------

def train_reference(settings: TrainSettings | None = None, *, on_status=None, **kwargs) -> TrainingSummary:
    """Train one reference model per scheme in `settings.norm`, in OUT/<scheme>, with identical data and seed;
    with `seeds` (a count or a list), one per scheme and seed, in OUT/<scheme>-seed<k>, on identical data.

    Returns a TrainingSummary; `interrupted` is set when Ctrl-C stopped the runs (after saving).
    A diverging scheme (NaN/Inf loss) is recorded as such and the next scheme starts.
    `on_status(line)` receives the plan (recipe, steps, data, embedding) before training starts.
    """
    s = settings or TrainSettings(**kwargs)
    if settings is not None and kwargs:
        s = TrainSettings(**{**asdict(settings), **kwargs})
    env = init_distributed(s.device)
    try:
        summary = _train_all(s, env, on_status)
        barrier(env)  # the last collective was rank 0's one-way broadcast: all arrive before the group ends
        return summary
    finally:
        shutdown(env)


def _token_data(plan: Plan, env: DistEnv, say) -> TokenData:
    """The training and held-out blocks (prepared once into the cache, then read by index) and the tokenizer."""
    s = plan.settings
    # An explicit embedding size (flag or recipe) applies to a named tokenizer; a BPE trained here has its own.
    embedding = s.vocab_size if (s.vocab_size is not None and s.tokenizer is not None) else None
    return load_token_data(s.data, plan.tokenizer_spec, seq_len=plan.seq_len, batch_size=plan.batch_size,
                           eval_samples=s.eval_samples, vocab_size=plan.vocab_size, embedding=embedding,
                           text_column=s.text_column, eval_spec=s.eval_data,
                           train_blocks=plan.steps * plan.batch_size, env=env, progress=s.progress and env.is_main,
                           say=say)


def _train_all(given: TrainSettings, env: DistEnv, on_status=None) -> TrainingSummary:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # only our progress bar
    # Settings are checked before anything heavy: a typo costs no data read, no model, no folder.
    plan = resolve_plan(given, env)
    s = plan.settings
    say = on_status if (on_status is not None and env.is_main) else None
    if say:
        for line in plan.describe(given):
            say(line)
    check_tokenizer_spec(s.tokenizer)
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out).expanduser()

    # The tokenizer and the data are shared by every scheme; the output folder is made once they are known good.
    data = _token_data(plan, env, say)
    if say:
        for line in data.describe(plan.seq_len):
            say(line)
    main_first(env, lambda: ensure_writable_dir(out))
    tokenizer, vocab = data.tokenizer, data.embedding_rows
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    if len(data.eval) < env.world_size:
        raise LayerprobeError(f"the held-out split has {len(data.eval)} blocks, fewer than the "
                              f"{env.world_size} processes; give more data")

    runs = []
    for seed_plan in plan.per_seed():  # --seeds: every scheme of one seed, then the next seed
        for scheme in plan.schemes:
            config = model_config(seed_plan, scheme, vocab, tokenizer)
            runs.append(Run(seed_plan, scheme, config, run_identity(seed_plan, config, fingerprint), tokenizer, data,
                            env, out))
    for run in runs:  # every folder is checked before anything is trained or deleted
        run.check_folder()
    barrier(env)
    for run in runs:
        run.prepare()

    # One scheme after another, sharing the stop flag: Ctrl-C saves the current run and leaves the rest.
    summary = TrainingSummary(out=str(out), settings={
        "preset": plan.preset, "steps": plan.steps, "seq_len": plan.seq_len, "batch_size": plan.batch_size,
        "lr": plan.lr, "seed": s.seed, "seeds": plan.seeds, "data_seed": plan.data_seed, "data": s.data, "eval_data": s.eval_data,
        "prepared": str(data.prepared) if data.prepared else None, "tokenizer": plan.tokenizer_spec,
        "vocab_size": vocab, "train_blocks": len(data.train), "eval_blocks": len(data.eval), "world_size": env.world_size,
        "device": str(env.device), "autocast": str(plan.autocast_dtype) if plan.autocast_dtype else "float32"})
    with StopFlag() as stop, make_progress(s.progress and env.is_main) as progress:
        for run in runs:
            if run.skip:
                summary.runs.append(run.result)
                continue
            result = run.train(stop, progress)
            summary.runs.append(result)
            if result.status == "interrupted":
                summary.interrupted = True
                break
    if env.is_main:
        write_json(out / "summary.json", summary.as_dict())
    return summary
