"""Hooks on every layer that stream per-layer statistics out of the model's own forward pass.

The residual stream is read at the layers (input of layer l, output of the last layer), not from
`output_hidden_states`, whose last entry comes after the final norm. Nothing is kept across
batches but running sums, so memory does not grow with the number of samples.

The logit lens and the angular distance are formed in `end_batch` from the layer outputs held for
the batch (the same tokens), in the model's dtype: a bf16 value converts to float64 exactly, so a
float64 copy would add bytes and no precision. The lens reads the model's own readout of the last
layer's output as the final distribution (`Anatomy.readout`: what the CausalLM does after its last
layer), so it does not need the model's full logits, which `analyze` never forms (see analysis).
Both run in chunks of tokens sized by a memory budget, every layer at once, on the layers' device.
With `--tokens all` and no backward on a GPU, the streams ((L+1) x tokens x hidden) are copied to
pinned host memory as the layers make them, on a side stream that overlaps the next layers, and come
back to the device one token chunk at a time (STREAM_CHUNK_BYTES for all L+1 layers), so the device
holds one chunk of them instead of all (`_store_unit`, `end_batch`). With a backward they stay: they
are the layer inputs the backward keeps anyway.
Under activation checkpointing the layers run again inside the backward: every hook returns at
once there (`_recomputing`), so nothing is counted twice and no recomputed graph is kept.
Sublayer updates come from forward hooks on each layer's attention and MLP children; they are
kept only for layers whose output is exactly input + attention + MLP (checked on the data), the
Pre-LN residual form, where those outputs are the updates (see `sublayer_updates`).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .anatomy import Anatomy, layer_input, one_stream, own_path_logits, residual_tensor, summarize_measured_scheme
from .defaults import FORWARD_METRICS
from .errors import LayerprobeError
from .metrics import (RunningMoments, angular_distance_sums, block_influence, final_distribution,
                      fused_layer_terms, lens_terms, token_variance)

TOKENS = ("last", "all")
# Logits per lens chunk (layers x tokens x vocabulary), whatever the batch size: 2^26, i.e. about
# 1 GiB with the model-dtype logits, their float32 log-softmax and the KL terms (~16 bytes each).
LENS_CHUNK_ELEMENTS = 1 << 26
# Device memory for one token chunk of the stored streams, all L+1 layers together, when end_batch brings
# them back from the host (`--tokens all` without a backward on an accelerator).
STREAM_CHUNK_BYTES = 512 << 20
# Where those streams wait for end_batch: None = on the host when they are made on an accelerator and
# exceed one chunk, on the layers' device otherwise; a device forces it (the tests force "cpu" on the CPU).
STREAM_HOST: str | None = None
# Devices whose streams stay where they are: the host itself, and Apple's unified memory, where a host copy
# saves nothing. ("meta" is an accelerator here: memory.py's faked runs stand it in for a GPU.)
STREAM_STAYS_ON = ("cpu", "mps")
# y = x + attention + MLP holds to rounding: |y - x - a - m| <= this many eps of the dtype x (|x|+|a|+|m|).
DECOMPOSITION_EPS = 16


def all_tokens_device_bytes(num_layers: int, tokens: int, hidden: int, element_size: int) -> int:
    """What `--tokens all` without a backward adds on the device over `--tokens last`, at most: the batch's
    (L+1) x tokens x hidden streams where they fit one chunk (they stay there), else one chunk of them,
    brought back from the host in end_batch (which also bounds the one layer's copy in flight in the forward)."""
    return min((num_layers + 1) * tokens * hidden * element_size, STREAM_CHUNK_BYTES)


def _ratio_sums() -> list:
    return [0.0, 0.0, 0]  # Σ ‖d‖/‖x‖, Σ cos(d, x), tokens


def _recomputing() -> bool:
    """Inside a backward pass: a checkpointed layer running again, whose statistics were already taken."""
    return torch._C._current_graph_task_id() != -1


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same memory seen the same way (a detached or re-wrapped view of one tensor counts). Compared by
    storage object and offset rather than data_ptr: a fake tensor (memory.py's faked runs) has no address."""
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.storage_offset() == b.storage_offset()
            and a.untyped_storage()._cdata == b.untyped_storage()._cdata)


class LayerCapture:
    """Context manager: while active, each forward through the model updates the statistics.

    Call `end_batch()` after each forward so the batch's angular-distance matrix is folded in.
    """

    def __init__(self, anatomy: Anatomy, tokens: str = "last", detect_placement: bool = True,
                 lens: bool = True, lens_chunk: int | None = None, metrics=None,
                 stream_host: str | torch.device | None = None, stream_chunk_bytes: int | None = None,
                 token_variance: bool = False):
        if tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {TOKENS}")
        # Which statistics to take (defaults.METRICS; None: every one): a hook does only the work of these.
        self.metrics = frozenset(FORWARD_METRICS if metrics is None else metrics) & frozenset(FORWARD_METRICS)
        self.anatomy = anatomy
        self.tokens = tokens
        self.num_layers = anatomy.num_layers
        L = self.num_layers
        self._inputs: dict[int, torch.Tensor] = {}
        self._units: list[torch.Tensor | None] = [None] * (L + 1)
        self._unit_devices: list[torch.device | None] = [None] * (L + 1)  # where each stream was made
        # `--tokens all` without a backward: where the streams wait for end_batch (STREAM_HOST) and the
        # device bytes of one chunk of them there.
        host = stream_host if stream_host is not None else STREAM_HOST
        self.stream_host = torch.device(host) if host is not None else None
        self.stream_chunk_bytes = stream_chunk_bytes or STREAM_CHUNK_BYTES
        self._copy_streams: dict = {}  # CUDA device -> the side stream of its host copies
        self._in_flight: torch.Tensor | None = None  # the device copy whose host copy may still run
        self._held = False  # this batch's streams went to stream_host: end_batch takes them in chunks
        self._handles: list = []
        self._placement_handles: list = []
        self.angular_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        self.angular_count = 0
        self.cos_sum = [0.0] * L  # per layer: sum over tokens of cos(input, output), float64 on device
        self.cos_count = [0] * L
        self.output_moments = [RunningMoments() for _ in range(L)]
        # train-reference's token variance (metrics/variance.py), only when asked: analyze does not log it.
        self.token_variance = token_variance and "variance" in self.metrics
        self.token_var_sum = [0.0] * L  # per layer: Σ over tokens of the variance over hidden units, float64
        self.token_var_count = [0] * L
        self.update_moments = [RunningMoments() for _ in range(L)]
        self.detect_placement = detect_placement
        self.placement: list[str] | None = None
        self._norm_feeds_input = [False] * L  # a norm child reads the layer's input: Pre-LN
        self._norm_outputs: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._is_post = [False] * L
        # Sandwich (Gemma-2/3/4, GLM-4): a norm reads a sublayer's output and its output goes back to the
        # stream, not into another sublayer (Bloom's post_attention_layernorm reads the attention's
        # output too, but that already holds the residual and the norm feeds the MLP: Pre-LN).
        self._norm_io: list[list[tuple]] = [[] for _ in range(L)]  # (norm input, norm output)
        self._sub_io: list[list[tuple]] = [[] for _ in range(L)]  # (sublayer input, sublayer output)
        self._after_sublayer = [False] * L
        # Logit lens (metrics/lens.py): sums over the angular-distance tokens.
        self.lens = lens and "lens" in self.metrics and anatomy.head is not None
        self._keep_units = "angular" in self.metrics or self.lens  # the streams end_batch reads
        self._layers_run = 0  # layers whose forward the hooks saw in this batch
        self.lens_chunk = lens_chunk
        self.lens_kl_sum = [0.0] * L
        self.lens_top1_sum = [0] * L
        self.lens_count = 0
        self._readout = None  # anatomy.readout, or the model's own path where that differs (see _choose_readout)
        self._output_len: int | None = None
        self._vocab_size: int | None = None
        # Residual updates (metrics/update.py) and activation extremes (metrics/activation.py), all tokens.
        self.update_ratio_sum = [0.0] * L
        self.update_cos_sum = [0.0] * L
        self.update_count = [0] * L  # tokens whose input is not all zero
        self.act_max: list[torch.Tensor | float] = [float("nan")] * L
        self.act_abs_sum = [0.0] * L
        self.act_count = [0] * L  # elements
        # Sublayer updates: per layer, the attention and MLP child read by hooks (None if not one).
        self.sublayer_names: list[tuple[str | None, str | None]] = [self._sublayer_pair(i) for i in range(L)]
        self.parallel = anatomy.extra.get("parallel_residual")
        self._sub_out: dict[tuple[int, str], torch.Tensor] = {}
        self.sub_sums = {(i, w): _ratio_sums() for i in range(L) for w in ("attention", "mlp")}
        self.decomposition_error: list[torch.Tensor | float] = [0.0] * L
        self._checking_decomposition = True
        # Per-sample partial sums for the intervals (metrics/intervals.py): per batch, name -> [B, ...]
        # on the device; per layer, filled by the hooks, stacked in end_batch. O(samples x layers).
        self._sample_batches: list[dict[str, torch.Tensor]] = []
        self._per_layer: dict[str, list] = {}
        self._batch_samples = 0
        self._sample_size = (0, 0)
        self._lens_batch = None

    def _sublayer_pair(self, index: int) -> tuple[str | None, str | None]:
        """(attention child, MLP child) of a layer: the one child of kind attention, and the last
        child of kind mlp (OPT's fc1, fc2: fc2 writes the update). None where there is none."""
        kinds = [(name, kind) for name, (kind, _) in self.anatomy.sublayers(index).items()]
        attn = [n for n, k in kinds if k == "attention"]
        mlp = [n for n, k in kinds if k == "mlp"]
        return (attn[0] if len(attn) == 1 else None), (mlp[-1] if mlp else None)

    # -- hooks -----------------------------------------------------------------------------
    def _store_unit(self, depth: int, h: torch.Tensor) -> None:
        """Keep the stream at `depth` for end_batch, in the model's dtype.

        With gradients the layer's input is kept for the backward anyway: a view costs nothing (and
        a model that changed it in place would fail its own backward). Otherwise a copy, so that
        nothing the model does to the tensor afterwards changes what was measured: on the host where
        every token's stream would hold device memory (`_stream_home`), else on the layer's device.
        """
        vecs = h[:, -1, :] if self.tokens == "last" else h.reshape(-1, h.shape[-1])
        vecs = vecs.detach()
        self._unit_devices[depth] = vecs.device
        if h.requires_grad and self.tokens == "all":
            self._units[depth] = vecs
            return
        home = self._stream_home(vecs)
        self._units[depth] = vecs.clone() if home is None else self._to_host(vecs, home)

    def _stream_home(self, vecs: torch.Tensor) -> torch.device | None:
        """Where a copied stream waits for end_batch if not on the layer's device (None: it stays there)."""
        if self.tokens != "all":
            return None  # one token per sample: nothing worth moving
        if self.stream_host is not None:
            return self.stream_host
        if vecs.device.type in STREAM_STAYS_ON:
            return None
        whole = (self.num_layers + 1) * vecs.numel() * vecs.element_size()
        return torch.device("cpu") if whole > self.stream_chunk_bytes else None

    def _to_host(self, vecs: torch.Tensor, home: torch.device) -> torch.Tensor:
        """A copy of `vecs` on `home`. From a GPU to the host: into pinned memory on a side stream, which
        runs beside the next layers; it starts once the model's stream has made `vecs` (wait_stream), and
        end_batch waits for it (`_wait_for_copies`)."""
        self._held = True
        if vecs.device == home:  # forced onto the device it is on (tests of the chunked path on the CPU)
            return vecs.clone()
        # Our own device copy first: the model may write its stream in place while the host copy runs.
        # It is held until the next layer's copy starts (one in flight), as the allocator holds it on a GPU.
        src = vecs.clone()
        if src.device.type == "cuda" and home.type == "cpu":
            side = self._copy_streams.get(src.device)
            if side is None:
                side = self._copy_streams[src.device] = torch.cuda.Stream(device=src.device)
            side.wait_stream(torch.cuda.current_stream(src.device))
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                host.copy_(src, non_blocking=True)
            src.record_stream(side)  # its memory is not reused before the copy has read it
        else:  # other accelerators (a blocking copy), and memory.py's faked runs, where "meta" is the GPU
            host = src.to(home)
        self._in_flight = src
        return host

    def _wait_for_copies(self) -> None:
        """The model's streams wait for the host copies (what reads the host copies runs on them)."""
        for device, side in self._copy_streams.items():
            torch.cuda.current_stream(device).wait_stream(side)
        self._in_flight = None

    def _unit_rows(self, depth: int, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) of the stream at `depth`, on the device that made it."""
        rows, device = self._units[depth][start:stop], self._unit_devices[depth]
        return rows if rows.device == device else rows.to(device, non_blocking=device.type == "cuda")

    def _token_chunks(self, n: int) -> list[tuple[int, int]]:
        """[start, stop) ranges of the batch's n tokens that end_batch takes at a time: all of them where the
        streams stayed on their devices, else as many as STREAM_CHUNK_BYTES holds for all L+1 layers."""
        if not self._held:
            return [(0, n)]
        row = sum(u.shape[-1] * u.element_size() for u in self._units)
        step = max(1, self.stream_chunk_bytes // row)
        return [(start, min(start + step, n)) for start in range(0, n, step)]

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            if _recomputing():
                return
            h = one_stream(layer_input(args, kwargs))
            self._inputs[index] = h
            self._batch_samples = h.shape[0]
            if self._keep_units:
                with torch.no_grad():
                    self._store_unit(index, h)

        return hook

    def _post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            if _recomputing():
                return
            y = residual_tensor(output)
            x = self._inputs.pop(index)
            if index == self.num_layers - 1:
                self._output_len = None if isinstance(output, torch.Tensor) else len(output)
            with torch.no_grad():
                # Under a device map the input can still be on the previous layer's GPU (accelerate moves
                # it inside forward, after this module's pre-hook): compare on the output's device.
                x, y = x.detach().to(y.device), y.detach()
                self._layers_run += 1
                self._sample_size = (y.numel() // (y.shape[0] * y.shape[-1]), y.numel() // y.shape[0])  # tokens, elements
                m = self.metrics
                groups = {g: g in m for g in ("influence", "variance", "updates", "activations")}
                if any(groups.values()):
                    # Every per-token term in one call (metrics/token_terms.py): float32 as always, and
                    # for a bf16/fp16 stream on a GPU one fused kernel that reads it without float32 copies.
                    a, mlp = self._sublayer_outputs(index, x) if groups["updates"] else (None, None)
                    t = fused_layer_terms(x, y, a, mlp, parallel=self.parallel,
                                          check=self._checking_decomposition, **groups)
                # Every sum is taken per sample first (the intervals resample samples), then totalled:
                # per token in float32 (metrics/token_terms.py), per sample and in total in float64.
                if "influence" in m:
                    cos = t["cos"]
                    ps = self._sample_sums(index, cos=cos.double())
                    self.cos_sum[index] = self.cos_sum[index] + ps["cos"].sum()
                    self.cos_count[index] += cos.numel()
                if "variance" in m:
                    ps = self._sample_sums(index, out_s1=t["y_sum"].double(), out_s2=t["y_norm"].double().square())
                    self.output_moments[index].add_sums(y.numel(), ps["out_s1"].sum(), ps["out_s2"].sum())
                    ps = self._sample_sums(index, upd_s1=t["d_sum"].double(), upd_s2=t["d_norm"].double().square())
                    self.update_moments[index].add_sums(y.numel(), ps["upd_s1"].sum(), ps["upd_s2"].sum())
                    if self.token_variance:
                        tv = token_variance(t["y_sum"], t["y_norm"], y.shape[-1])
                        self.token_var_sum[index] = self.token_var_sum[index] + tv.sum()
                        self.token_var_count[index] += tv.numel()
                if "updates" in m:
                    seen = t["seen"]
                    ps = self._sample_sums(index, upd_ratio=t["ratio"].double(), upd_cos=t["cos_update"].double(),
                                           upd_count=seen.double())
                    self.update_ratio_sum[index] = self.update_ratio_sum[index] + ps["upd_ratio"].sum()
                    self.update_cos_sum[index] = self.update_cos_sum[index] + ps["upd_cos"].sum()
                    self.update_count[index] = self.update_count[index] + seen.sum()
                    if a is not None:
                        self._sublayer_updates(index, t)
                if "activations" in m:
                    peak, abs_sum = t["peak"], t["abs_sum"]
                    prev = self.act_max[index]
                    self.act_max[index] = peak if isinstance(prev, float) else torch.maximum(prev, peak)
                    self.act_abs_sum[index] = self.act_abs_sum[index] + abs_sum
                    self.act_count[index] += y.numel()
                if index == self.num_layers - 1 and self._keep_units:
                    self._store_unit(self.num_layers, y)
                if self._placement_handles:
                    self._is_post[index] = any(_same_tensor(o, y) for o in self._norm_outputs[index])
                    self._after_sublayer[index] = self._after_sublayer[index] or self._norm_after_sublayer(index)
                    self._norm_outputs[index], self._norm_io[index], self._sub_io[index] = [], [], []

        return hook

    def _sample_sums(self, index: int, **per_token: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each [B, T] per-token tensor summed over its sample's tokens, [B] float64, kept for layer `index`."""
        out = {}
        for name, values in per_token.items():
            out[name] = values.reshape(values.shape[0], -1).sum(-1)
            self._per_layer.setdefault(name, [None] * self.num_layers)[index] = out[name]
        return out

    def _sublayer_outputs(self, index: int, x: torch.Tensor) -> tuple:
        """(attention output, MLP output) of layer `index` for `layer_terms`, if both children's outputs were
        seen and have x's size (OPT's fc2 sees the tokens flattened to [B*T, H]: same rows, another shape);
        else (None, None), and the layer gets no sublayer rows."""
        a = self._sub_out.pop((index, "attention"), None)
        m = self._sub_out.pop((index, "mlp"), None)
        if a is None or m is None or a.numel() != x.numel() or m.numel() != x.numel():
            self.decomposition_error[index] = float("inf")
            return None, None
        return a.detach(), m.detach()

    def _sublayer_updates(self, index: int, t: dict) -> None:
        """Attention and MLP updates of layer `index` from its per-token terms (`layer_terms`).

        Where y = x + a + m (Pre-LN, sequential or parallel), a is the attention's update of x and
        m the MLP's update of x + a (sequential) or of x (parallel residual: both read x); for an
        architecture we do not know the MLP's stream is unknown and it gets no row. The relative
        violation of that identity on the first batch is kept; tables drop layers where it fails.
        """
        if self._checking_decomposition:
            # Like the norm placement, a property of the architecture: the first batch tells it.
            scale = t["x_norm"].sum() + t["a_norm"].sum() + t["m_norm"].sum()
            err = (t["rest_norm"].sum() / scale.clamp_min(1e-30)).double()  # ‖d − a − m‖, d = y − x
            prev = self.decomposition_error[index]
            self.decomposition_error[index] = err.clamp_min(prev) if isinstance(prev, float) else torch.maximum(prev, err)
        for which in ("attention", "mlp"):
            if which in t:
                ratio, cos, seen = t[which]
                sums = self.sub_sums[(index, which)]
                sums[0] = sums[0] + ratio.sum(dtype=torch.float64)
                sums[1] = sums[1] + cos.sum(dtype=torch.float64)
                sums[2] = sums[2] + seen.sum()

    def _child_hook(self, index: int, which: str):
        def hook(module, args, output):
            if _recomputing():
                return
            try:
                self._sub_out[(index, which)] = residual_tensor(output)
            except LayerprobeError:  # an output we cannot read: this layer gets no sublayer rows
                pass

        return hook

    def _lens_ready(self) -> bool:
        """The readout the lens reads (chosen on the first batch), False where none gives the model's logits."""
        if self._readout is None:
            self._readout = self._choose_readout(self._unit_rows(self.num_layers, 0, 8))
            if self._readout is None:
                self.lens = False  # no path gives the model's logits: no lens (NaN) rather than a wrong one
        return self.lens

    def _lens(self, rows: list[torch.Tensor], first: int, n_tokens: int, sums: list | None) -> list:
        """Every layer's lens for tokens [first, first + len) of the batch's n_tokens (`rows`: the L+1
        streams there), in chunks, all layers in one readout: one pass over the head's weights
        (vocabulary x hidden) per chunk, and one log-softmax, KL and argmax over [layers, tokens,
        vocabulary]. The final distribution is the readout of the last layer's output, the model's own
        logits for those tokens (the readout is checked to be the model's own path on the first batch:
        `_choose_readout`). `sums`: what the earlier token ranges of the batch gave (None for the first);
        returns it with these tokens added; `_lens_done` folds it in."""
        L = self.num_layers
        device = rows[L].device
        step = self.lens_chunk or max(1, LENS_CHUNK_ELEMENTS // (self._vocab(rows[L]) * L))
        B = self._batch_samples
        per_sample = n_tokens // B  # tokens of one sample: 1 (last) or T (all), in sample order
        if sums is None:
            sums = [None, None, torch.zeros(L, B, dtype=torch.float64, device=device),
                    torch.zeros(L, B, dtype=torch.float64, device=device)]
        kl_ps, agree_ps = sums[2], sums[3]
        for start in range(0, rows[L].shape[0], step):
            # y_layer = the input of the next layer, already held for the angular distance
            h = torch.cat([rows[layer + 1][start:start + step].to(device) for layer in range(L)])
            lens_logits = self._readout(h).to(device).reshape(L, h.shape[0] // L, -1)
            kl_t, agree_t = lens_terms(final_distribution(lens_logits[-1]), lens_logits)
            kl, agree = kl_t.sum(-1, dtype=torch.float64), agree_t.sum(-1)
            ids = torch.arange(first + start, first + start + kl_t.shape[-1], device=kl_t.device) // per_sample
            kl_ps.index_add_(1, ids.to(device), kl_t.double().to(device))
            agree_ps.index_add_(1, ids.to(device), agree_t.double().to(device))
            sums[0] = kl if sums[0] is None else sums[0] + kl
            sums[1] = agree if sums[1] is None else sums[1] + agree
        return sums

    def _lens_done(self, sums: list, n_tokens: int) -> None:
        kl_sum, agree_sum, kl_ps, agree_ps = sums
        for layer in range(self.num_layers):
            self.lens_kl_sum[layer] = self.lens_kl_sum[layer] + kl_sum[layer]
            self.lens_top1_sum[layer] = self.lens_top1_sum[layer] + agree_sum[layer]
        self.lens_count += n_tokens
        self._lens_batch = (kl_ps.T, agree_ps.T, n_tokens // self._batch_samples)

    def _vocab(self, last: torch.Tensor) -> int:
        if self._vocab_size is None:
            with torch.no_grad():
                self._vocab_size = self._readout(last[:1]).shape[-1]
        return self._vocab_size

    def _choose_readout(self, last: torch.Tensor):
        """The rebuilt readout (final norm, head, logit transform) if, on `last` (the first batch's first
        last-layer outputs), it gives what the model's own path gives (anatomy.own_path_logits: the model's
        forward with every layer standing in for the given stream); else that own path; None when the own
        path cannot run."""
        if is_fake(last):  # memory.py sizes a faked run: values mean nothing there; size the common path
            return self.anatomy.readout

        def own(h):
            return own_path_logits(self.anatomy, h, self._output_len)

        try:
            want = own(last).float()
        except Exception:  # a path this model cannot run with stand-in layers: no lens rather than a guess
            return None
        tol = 1e-4 if last.dtype == torch.float32 else 3e-2  # as the sweep's check (pruning/prefix.py)
        try:
            got = self.anatomy.readout(last).float().to(want.device)
            if got.shape == want.shape and bool((got - want).abs().max() <= tol * want.abs().max().clamp_min(1e-6)):
                return self.anatomy.readout
        except Exception:  # the rebuilt readout does not run on this model: its own path does
            pass
        return own

    def _norm_after_sublayer(self, index: int) -> bool:
        """A norm of this layer read an attention/MLP output and fed no attention/MLP: a sandwich's outer norm."""
        outs = [o for _, o in self._sub_io[index] if o is not None]
        ins = [i for i, _ in self._sub_io[index] if i is not None]
        return any(n_in is not None and any(_same_tensor(n_in, o) for o in outs)
                   and not any(_same_tensor(n_out, i) for i in ins)
                   for n_in, n_out in self._norm_io[index])

    def _sub_io_hook(self, index: int):
        def hook(module, args, kwargs, output):
            if _recomputing():  # a checkpointed layer again in the backward: it would hold its tensors
                return
            try:
                inp = layer_input(args, kwargs)
            except LayerprobeError:
                inp = None
            try:
                out = residual_tensor(output)
            except LayerprobeError:
                out = None
            self._sub_io[index].append((inp, out))

        return hook

    def _norm_hook(self, index: int):
        # Placement is read from tensor identity, not values: a Pre-LN norm is handed the very
        # tensor the layer received, and a Post-LN layer returns the very tensor its norm made.
        def hook(module, args, kwargs, output):
            if _recomputing() or not isinstance(output, torch.Tensor):
                return
            try:
                inp = layer_input(args, kwargs)
            except LayerprobeError:  # a norm called some other way tells nothing about placement
                inp = None
            x = self._inputs.get(index)
            if inp is not None and x is not None and _same_tensor(inp, x):
                self._norm_feeds_input[index] = True
            self._norm_outputs[index].append(output)
            self._norm_io[index].append((inp, output))

        return hook

    def __enter__(self):
        for i, layer in enumerate(self.anatomy.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post_hook(i), with_kwargs=True))
            children = dict(layer.named_children())
            for which, name in zip(("attention", "mlp"), self.sublayer_names[i]):
                if name is not None and "updates" in self.metrics:
                    self._handles.append(children[name].register_forward_hook(self._child_hook(i, which)))
            if self.detect_placement and self.placement is None:
                for name, (kind, module) in self.anatomy.sublayers(i).items():
                    if kind in ("norm", "attention", "mlp"):
                        hook = self._norm_hook(i) if kind == "norm" else self._sub_io_hook(i)
                        self._placement_handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles + self._placement_handles:
            h.remove()
        self._handles, self._placement_handles = [], []
        self._inputs.clear()
        self._sub_out.clear()
        self._in_flight = None
        return False

    # -- per batch -------------------------------------------------------------------------
    def end_batch(self) -> None:
        if self._layers_run < self.num_layers or (self._keep_units and any(u is None for u in self._units)):
            raise LayerprobeError("not every layer ran in the model's forward pass; name the layer list with --layers-path")
        self._layers_run = 0
        B = self._batch_samples
        per_sample = None
        with torch.no_grad():
            self._wait_for_copies()
            n = self._units[0].shape[0] if self._keep_units else 0
            lens = self.lens and self._lens_ready()
            lens_sums = None
            for start, stop in self._token_chunks(n) if self._keep_units else ():
                rows = [self._unit_rows(depth, start, stop) for depth in range(self.num_layers + 1)]
                if lens:
                    lens_sums = self._lens(rows, start, n, lens_sums)
                if "angular" in self.metrics:  # on the first layer's device
                    part = angular_distance_sums(rows, groups=B, first=start, group_size=n // B)
                    per_sample = part if per_sample is None else per_sample + part
                del rows
            if lens:
                self._lens_done(lens_sums, n)
            if per_sample is not None:
                sums = per_sample.sum(0)
                self.angular_sum = self.angular_sum.to(sums.device) + sums
                self.angular_count += n
        self._keep_sample_sums(per_sample)
        self._units = [None] * (self.num_layers + 1)
        self._held = False
        self._sub_out.clear()
        self._checking_decomposition = False
        if self._placement_handles:
            # Placement is a property of the architecture: one batch tells it; stop paying for it.
            self.placement = [
                "post" if post else ("sandwich" if pre and after else "pre" if pre else "post-sublayer" if after
                                     else "?")
                for post, pre, after in zip(self._is_post, self._norm_feeds_input, self._after_sublayer)
            ]
            for h in self._placement_handles:
                h.remove()
            self._placement_handles = []

    def _keep_sample_sums(self, angular: torch.Tensor | None) -> None:
        """The batch's per-sample sums, [B, ...] each, kept on the device (no host sync per batch)."""
        B, batch = self._batch_samples, {}
        dev = angular.device if angular is not None else self.anatomy.input_device
        if angular is not None:
            tokens = self._units[0].shape[0] // B
            batch.update(angular=angular, angular_tokens=torch.full((B,), float(tokens), dtype=torch.float64))
        for name, per_layer in self._per_layer.items():
            if all(v is not None for v in per_layer):
                batch[name] = torch.stack([v.to(dev) for v in per_layer], dim=1)
        if set(batch) & {"cos", "out_s1"}:
            seq, elements = self._sample_size
            batch["tokens"] = torch.full((B,), float(seq), dtype=torch.float64)
            batch["out_n"] = torch.full((B,), float(elements), dtype=torch.float64)
        if self._lens_batch is not None:
            kl, agree, per_sample = self._lens_batch
            batch.update(lens_kl=kl.to(dev), lens_top1=agree.to(dev),
                         lens_tokens=torch.full((B,), float(per_sample), dtype=torch.float64))
            self._lens_batch = None
        self._sample_batches.append(batch)
        self._per_layer = {}

    def per_sample_sums(self) -> dict:
        """name -> [samples, ...] numpy float64: the partial sums each statistic is a ratio of, per
        sample in data order (see layer_intervals in metrics/intervals.py for which is which)."""
        if not self._sample_batches:
            return {}
        names = set.intersection(*(set(b) for b in self._sample_batches))
        return {n: torch.cat([b[n].cpu() for b in self._sample_batches]).numpy() for n in sorted(names)}

    # How the processes of a data-parallel run combine this state (all_reduce below): per-layer lists and
    # totals that add up, and extremes that take the largest. Placement is the architecture's: each has it.
    SUMMED = ("angular_sum", "angular_count", "cos_sum", "cos_count", "lens_kl_sum", "lens_top1_sum", "lens_count",
              "update_ratio_sum", "update_cos_sum", "update_count", "act_abs_sum", "act_count", "token_var_sum",
              "token_var_count")
    MAXED = ("act_max", "decomposition_error")

    def all_reduce(self, env, start: int, total: int, extra=()) -> list[float]:
        """Fold every process's sums into this capture with one packed collective (distributed.py): this
        process measured samples [start, start + own) of `total`; the per-sample sums come back in global
        sample order. `extra`: more numbers to add over processes; returns their totals."""
        from .distributed import all_reduce_packed

        if not env.distributed:
            return [float(v) for v in extra]
        samples = self.per_sample_sums()
        names = sorted(samples)
        moments = self.output_moments + self.update_moments
        subs = list(self.sub_sums.values())
        summed, maxed, rows = all_reduce_packed(
            env, summed=[getattr(self, n) for n in self.SUMMED] + [[(m.count, m.s1, m.s2) for m in moments], subs,
                                                                    list(extra)],
            maxed=[getattr(self, n) for n in self.MAXED], rows=[samples[n] for n in names], start=start, total=total)
        for name, value in zip(self.SUMMED, summed):
            old = getattr(self, name)
            if isinstance(old, list):
                setattr(self, name, value.tolist())
            elif isinstance(old, torch.Tensor):
                setattr(self, name, value.reshape(old.shape))
            else:
                setattr(self, name, int(value) if isinstance(old, int) else float(value))
        for m, (count, s1, s2) in zip(moments, summed[len(self.SUMMED)].reshape(-1, 3).tolist()):
            m.count, m.s1, m.s2 = int(count), s1, s2
        for sums, new in zip(subs, summed[len(self.SUMMED) + 1].reshape(-1, 3).tolist()):
            sums[:] = new
        for name, value in zip(self.MAXED, maxed):
            setattr(self, name, value.tolist())
        self._sample_batches = [{n: torch.from_numpy(r) for n, r in zip(names, rows)}] if names else []
        return summed[-1].tolist()

    # -- results ---------------------------------------------------------------------------
    def per_layer(self) -> dict[str, list[float]]:
        """Every per-layer statistic of the pass, column name -> one value per layer: the columns of
        analyze's layers.csv that the forward gives (the monitor's probe logs the same); only those of
        the metrics taken (METRIC_COLUMNS in defaults.py)."""
        m, out = self.metrics, {}
        if "angular" in m:
            angular_mean = self.angular_mean()
            out["angular_distance"] = [float(angular_mean[i, i + 1]) for i in range(self.num_layers)]
        if "influence" in m:
            out["block_influence"] = self.block_influence()
        if "variance" in m:
            out["output_variance"] = [mo.variance for mo in self.output_moments]
            out["update_variance"] = [mo.variance for mo in self.update_moments]
            if self.token_variance:
                out["token_variance"] = [float(s) / n if n else float("nan")
                                         for s, n in zip(self.token_var_sum, self.token_var_count)]
        if "lens" in m:  # NaN where the model has no head: asked for, not measurable
            out.update(lens_kl=self.lens_kl(), lens_top1=self.lens_top1())
        if "updates" in m:
            out.update(relative_update=self.relative_update(), update_cosine=self.update_cosine())
        if "activations" in m:
            out.update(max_activation=self.max_activation(), mean_abs_activation=self.mean_abs_activation())
        return out

    def angular_mean(self) -> torch.Tensor:
        return self.angular_sum.cpu() / max(self.angular_count, 1)

    def block_influence(self) -> list[float]:
        return [block_influence(s, c) for s, c in zip(self.cos_sum, self.cos_count)]

    def lens_kl(self) -> list[float]:
        """Mean KL(p_final ‖ p_layer) in nats per layer (NaN without a lens)."""
        n = self.lens_count
        return [float(s) / n if n else float("nan") for s in self.lens_kl_sum]

    def lens_top1(self) -> list[float]:
        n = self.lens_count
        return [float(s) / n if n else float("nan") for s in self.lens_top1_sum]

    def relative_update(self) -> list[float]:
        return [float(s) / int(c) if int(c) else float("nan") for s, c in zip(self.update_ratio_sum, self.update_count)]

    def update_cosine(self) -> list[float]:
        return [float(s) / int(c) if int(c) else float("nan") for s, c in zip(self.update_cos_sum, self.update_count)]

    def max_activation(self) -> list[float]:
        return [float(v) for v in self.act_max]

    def mean_abs_activation(self) -> list[float]:
        return [float(s) / n if n else float("nan") for s, n in zip(self.act_abs_sum, self.act_count)]

    def decomposes(self, index: int, dtype: torch.dtype) -> bool:
        """Whether layer `index`'s output was input + attention + MLP on the first batch, to rounding."""
        return float(self.decomposition_error[index]) <= DECOMPOSITION_EPS * torch.finfo(dtype).eps

    def sublayer_updates(self, dtype: torch.dtype) -> dict[tuple[int, str], tuple[float, float]]:
        """(layer, "attention"|"mlp") -> (relative_update, update_cosine), for the layers whose output
        is exactly input + attention output + MLP output (`dtype`: the model's, for the rounding bound).

        Under Post-LN (and sandwich, DeepNorm, HybridNorm's FFN) the residual add sits inside a norm:
        the sublayer's output is not what the stream gains, so those layers get no sublayer rows; the
        layer-level relative_update (y − x) still includes what the norm does.
        """
        out = {}
        for (index, which), (r, c, n) in self.sub_sums.items():
            n = int(n)
            if n and self.decomposes(index, dtype):
                out[(index, which)] = (float(r) / n, float(c) / n)
        return out

    def measured_scheme(self) -> tuple[str, int | None]:
        return summarize_measured_scheme(self.placement or [])
