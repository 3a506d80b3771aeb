"""The one loader: folders of every tested architecture, the real SmolLM2 GGUF, hub ids, and the
bad inputs users give it, each of which must end as one clear line in a LayerprobeError."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tiny_models import ARCHS, VOCAB, make_tiny, random_ids

from layerprobe import loading
from layerprobe.anatomy import find_anatomy
from layerprobe.errors import LayerprobeError
from layerprobe.loading import builtin_model_path, context_length, load_model, resolve_spec


def _error(spec, **kwargs) -> str:
    """The message of the LayerprobeError that loading `spec` raises; it must be one line."""
    with pytest.raises(LayerprobeError) as e:
        load_model(str(spec), **kwargs)
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """arch -> folder of a saved tiny model, built once per session (conftest.py)."""
    return tiny_dir


# --- every architecture loads from a folder ------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_folder_of_each_arch_loads(tiny, arch):
    folder = tiny(arch)
    lm = load_model(str(folder), device="cpu")
    assert lm.source == "folder" and lm.name == folder.name and lm.spec == str(folder)
    assert lm.config.model_type == arch and lm.config.architectures[0].endswith(("ForCausalLM", "LMHeadModel"))
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert not lm.model.training
    assert lm.tokenizer is None  # none was saved; an empty one built from the config is not kept
    # The weights are the saved ones, not a fresh random init: same seed, same logits.
    with torch.no_grad():
        logits = lm.model(random_ids()).logits
    again = load_model(str(folder), load_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(logits, again.model(random_ids()).logits)
    assert logits.shape == (2, 8, VOCAB) and torch.isfinite(logits).all()
    assert sum(p.numel() for p in lm.model.parameters()) < 100_000  # tiny stays tiny


def test_make_tiny_is_seeded(tmp_path):
    from safetensors.torch import load_file

    for arch in ("llama", "falcon"):
        a = load_file(make_tiny(arch, tmp_path / f"{arch}-a") / "model.safetensors")
        b = load_file(make_tiny(arch, tmp_path / f"{arch}-b") / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown tiny arch"):
        make_tiny("transformer-xl", tmp_path / "x")


def test_tokenizer_is_loaded_when_saved(tiny):
    lm = load_model(str(tiny("llama", tokenizer=True)))
    ids = lm.tokenizer("Hello")["input_ids"]
    assert len(ids) == 5 and max(ids) < VOCAB and lm.tokenizer.decode(ids) == "Hello"


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16), ("auto", torch.float32)])
def test_dtype(tiny, dtype, expected):
    lm = load_model(str(tiny("gpt2")), dtype=dtype, device="cpu", load_tokenizer=False)
    assert lm.dtype == expected
    assert {p.dtype for p in lm.model.parameters()} == {expected}


def test_device_map_auto_loads(tiny):
    # Here accelerate has one device to fill; on a GPU machine it would spread the layers.
    lm = load_model(str(tiny("llama")), device_map="auto", load_tokenizer=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert lm.device.type == expected and {p.device.type for p in lm.model.parameters()} == {expected}
    with torch.no_grad():
        assert lm.model(random_ids().to(lm.device)).logits.shape == (2, 8, VOCAB)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float64"}, "unknown --dtype"),
    ({"device": "tpu"}, "unknown --device"),
    ({"device_map": "spread"}, "unknown --device-map"),
    ({"revision": "main"}, "--revision only applies to hub ids"),
])
def test_bad_options(tiny, kwargs, match):
    assert match in _error(tiny("llama"), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_without_gpu(tiny):
    assert "no CUDA GPU" in _error(tiny("llama"), device="cuda")


def test_context_length(tiny):
    lm = load_model(str(tiny("gpt2")), load_tokenizer=False)
    assert context_length(lm.config) == 128  # n_positions
    lm = load_model(str(tiny("bloom")), load_tokenizer=False)
    assert context_length(lm.config) is None  # ALiBi: no position limit in the config


# --- bad input: one line each --------------------------------------------------------------------

def test_missing_path(tmp_path):
    for spec in (tmp_path / "nothing-here", "./not-there", "a/b/c", "weird name", "x.gguf"):
        assert "no such file or folder" in _error(spec)


def test_folder_without_model(tmp_path):
    assert "no model in folder" in _error(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    assert "no model in folder" in _error(tmp_path)


def test_folder_with_config_but_no_weights(tiny, tmp_path):
    shutil.copy(tiny("llama") / "config.json", tmp_path / "config.json")
    assert "no weights in folder" in _error(tmp_path)


def test_file_that_is_not_gguf(tiny):
    assert "not a .gguf model" in _error(tiny("llama") / "config.json")


def test_broken_config_json(tiny, tmp_path):
    shutil.copy(tiny("llama") / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    assert "is not a readable JSON config" in _error(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garble-header", "truncate-data"])
def test_corrupt_weights(tiny, tmp_path, damage):
    shutil.copytree(tiny("llama"), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garble-header":
        data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
    else:  # the header intact, the tensor bytes cut short
        data = data[: 8 + header_len + 100]
    weights.write_bytes(data)
    message = _error(tmp_path / "m")
    assert "could not be read" in message and "corrupt or truncated" in message


def test_corrupt_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    (tmp_path / "noise.gguf").write_bytes(bytes(range(256)) * 8)
    for name in ("junk.gguf", "noise.gguf"):
        assert "corrupt or truncated" in _error(tmp_path / name)


def test_folder_of_several_ggufs_asks_which(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert "holds 2 .gguf files" in _error(tmp_path)


def _save(model, path):
    model.save_pretrained(path)
    return path


def test_encoder_is_not_a_causal_lm(tmp_path):
    # transformers maps BERT to BertLMHeadModel, so this must be refused by the loader itself.
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    message = _error(_save(BertForMaskedLM(config), tmp_path / "bert"))
    assert "bert" in message and "not a causal language model" in message


def test_encoder_decoder_is_not_a_causal_lm(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
    assert "encoder-decoder" in _error(_save(BartForConditionalGeneration(config), tmp_path / "bart"))


def test_classifier_head_is_not_a_causal_lm(tmp_path):
    from tiny_models import tiny_config
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config("llama", num_labels=2))
    assert "LlamaForSequenceClassification, not a causal language model" in _error(_save(model, tmp_path / "cls"))


def test_base_model_without_lm_head_is_refused(tmp_path):
    # Loading it as a causal LM would silently give lm_head random weights.
    from tiny_models import tiny_config
    from transformers import LlamaModel

    torch.manual_seed(0)
    message = _error(_save(LlamaModel(tiny_config("llama")), tmp_path / "base"))
    assert "lacks weights for lm_head.weight" in message


def test_remote_code_needs_the_flag(tiny, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_own_lm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                     "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    assert "--trust-remote-code" in _error(folder)


REMOTE_CONFIG = """from transformers import LlamaConfig


class MyLMConfig(LlamaConfig):
    model_type = "mylm"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_mylm import MyLMConfig


class MyLMForCausalLM(LlamaForCausalLM):
    config_class = MyLMConfig
"""


def test_remote_code_loads_with_the_flag(tiny, tmp_path, monkeypatch):
    import sys

    import transformers.dynamic_module_utils as dynamic

    # transformers copies the model's code into a modules cache and imports it from there: keep
    # that cache, sys.path and sys.modules inside this test.
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)  # a package imported from another cache would shadow ours

    folder = tmp_path / "mylm"
    shutil.copytree(tiny("llama"), folder)
    (folder / "configuration_mylm.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_mylm.py").write_text(REMOTE_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mylm", architectures=["MyLMForCausalLM"],
                  auto_map={"AutoConfig": "configuration_mylm.MyLMConfig",
                            "AutoModelForCausalLM": "modeling_mylm.MyLMForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))

    assert "--trust-remote-code" in _error(folder)  # off by default
    lm = load_model(str(folder), trust_remote_code=True, load_tokenizer=False)
    assert type(lm.model).__name__ == "MyLMForCausalLM" and lm.config.model_type == "mylm"
    an = find_anatomy(lm.model)  # found by its known path; the scheme is left to measurement
    assert (an.layers_path, an.num_layers, an.norm_scheme) == ("model.layers", 3, "unknown")


def test_unknown_model_type(tiny, tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(tiny("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama9000"
    (folder / "config.json").write_text(json.dumps(config))
    message = _error(folder)
    assert "(llama9000)" in message and "does not know" in message


# --- hub ids -------------------------------------------------------------------------------------

@pytest.fixture
def fresh_hub(monkeypatch, tmp_path):
    """An empty hub cache, and no offline switch unless a test sets one."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hub-cache"


def test_hub_id_offline_fails_fast(fresh_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    message = _error("some-org/some-model", revision="v1.0")
    assert time.monotonic() - start < 5
    assert "'some-org/some-model'" in message and "HF_HUB_OFFLINE=1" in message and "'v1.0'" in message


def test_hub_id_unreachable_fails_fast(fresh_hub, monkeypatch):
    # Nothing listens on port 9 of this machine: the probe is refused at once, where transformers
    # alone would retry for ~25 s.
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    message = _error("gpt2")
    assert time.monotonic() - start < loading.HUB_PROBE_TIMEOUT_S
    assert "hub cannot be reached" in message and "127.0.0.1:9" in message


def test_hub_answering_5xx_counts_as_unreachable(fresh_hub, monkeypatch):
    # A proxy without a route answers 502/503 at once; transformers would retry it for ~25 s.
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Unavailable(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert loading.hub_unreachable_reason().endswith("answered HTTP 503")
        assert "answered HTTP 503" in _error("some-org/some-model")
    finally:
        server.shutdown()
        server.server_close()


def _fake_hub_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay `folder` out as huggingface_hub caches a download of `repo_id` at `main`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return commit


def test_cached_hub_id_loads_without_the_hub(fresh_hub, monkeypatch, tiny):
    commit = _fake_hub_cache(fresh_hub, "tiny-org/tiny-llama", tiny("llama"))
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # unreachable
    load_model(str(tiny("llama")), load_tokenizer=False)  # imports done, so the clock sees only the hub part
    start = time.monotonic()
    lm = load_model("tiny-org/tiny-llama", load_tokenizer=False)
    assert time.monotonic() - start < 5  # no retries against the dead endpoint
    assert (lm.source, lm.name, lm.config.model_type) == ("hub", "tiny-org--tiny-llama", "llama")
    lm = load_model("tiny-org/tiny-llama", revision=commit, load_tokenizer=False)
    assert lm.name == f"tiny-org--tiny-llama@{commit}" and lm.revision == commit
    # A revision that is not cached cannot be fetched: said in one line, not after retries.
    assert "revision 'v2'" in _error("tiny-org/tiny-llama", revision="v2")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model("tiny-org/tiny-llama", load_tokenizer=False).config.model_type == "llama"


# --- layerprobe checkpoints ----------------------------------------------------------------------

def test_layerprobe_checkpoint(tmp_path):
    from layerprobe.reference import LayerprobeConfig, LayerprobeForCausalLM

    torch.manual_seed(0)
    config = LayerprobeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, norm_scheme="mix", post_ln_layers=1)
    folder = _save(LayerprobeForCausalLM(config), tmp_path / "ref")
    lm = load_model(str(folder), load_tokenizer=False)
    assert lm.source == "layerprobe" and lm.config.model_type == "layerprobe"
    an = find_anatomy(lm.model)
    assert (an.layers_path, an.num_layers, an.final_norm_path) == ("model.layers", 4, "model.norm")
    assert (an.norm_scheme, an.post_ln_layers) == ("mix", 1)
    assert {k: kind for k, (kind, _) in an.sublayers(0).items()} == {
        "self_attn": "attention", "mlp": "mlp", "attn_norm": "norm", "mlp_norm": "norm"}


def test_layerprobe_checkpoint_without_reference_package(tmp_path, monkeypatch):
    folder = tmp_path / "ref"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "layerprobe"}))
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(loading, "_reference_import_error", lambda: ImportError("no module named torch_thing"))
    message = _error(folder)
    assert "layerprobe checkpoint" in message and "no module named torch_thing" in message


# --- the real SmolLM2-135M GGUF ------------------------------------------------------------------

def test_smollm2_gguf(smollm2):
    lm = smollm2
    assert lm.source == "gguf" and lm.name == "SmolLM2-135M-Instruct.Q4_1"
    assert lm.config.model_type == "llama" and lm.config.num_hidden_layers == 30
    an = find_anatomy(lm.model)
    assert (an.num_layers, an.layers_path, an.final_norm_path, an.norm_scheme) == (30, "model.layers", "model.norm", "pre")
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert torch.isfinite(logits).all()
    # A real model, not random weights: it continues this sentence with " Paris".
    assert lm.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    assert context_length(lm.config) == lm.config.max_position_embeddings > 0


def test_smollm2_by_file_and_folder_resolves_to_the_same_gguf(smollm2):
    # Loading again would cost another 20 s; the file path must resolve exactly as the alias did.
    path = builtin_model_path("smollm2")
    by_alias, by_file, by_folder = resolve_spec("smollm2"), resolve_spec(str(path)), resolve_spec(str(path.parent))
    for r in (by_file, by_folder):
        assert (r.location, r.kwargs, r.source, r.name) == (by_alias.location, by_alias.kwargs, "gguf", smollm2.name)
    assert by_file.kwargs == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
