"""Tiny transformers models for `pe-export rewrite` tests and benchmarks, and their float64 oracle.

Every family is built from a transformers 5.23 config with tiny sizes and random weights (nothing is
downloaded), q/k projections scaled up (QK_SCALE) so that RoPE phase reaches the logits, and exported
with torch.onnx.export(dynamo=True) with inputs (input_ids, position_ids) -> logits.

The oracle is the same torch model in float64 whose rotary module computes cos/sin in float64 from a
float64 `inv_freq`: transformers' own rope-init function run with `torch.float` meaning float64 (so its
arithmetic, not pe-export's, defines the frequencies), LongRoPE's short/long switch kept.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

QK_SCALE = 8.0
WITHIN = 3.0  # the rewritten error at the table's end, as a multiple of its error at positions 0-63
GROWS = 10.0  # the original's error at the end, as a multiple of its error at 0-63 (it grows with the position)


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers' config class key
    config: dict  # beyond the tiny sizes
    last: int  # the last position the tests probe (the table's end)
    slow: bool = True
    sizes: dict = field(
        default_factory=lambda: dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    )


FAMILIES = [
    Family(
        "llama",
        "llama",
        dict(max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        last=32768,
        slow=False,
    ),
    Family(
        "llama3",
        "llama",
        dict(
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        last=131072,
    ),
    Family(
        "qwen2-yarn",
        "qwen2",
        dict(
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        ),
        last=131072,
    ),
    Family(
        "mistral",
        "mistral",
        dict(
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            sliding_window=None,
        ),
        last=32768,
    ),
    Family(
        "gpt-neox",
        "gpt_neox",
        dict(
            max_position_embeddings=16384,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        ),
        last=16384,
        sizes=dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    ),
    Family(
        "phi3-longrope",
        "phi3",
        dict(
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            pad_token_id=0,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0],
                "long_factor": [1.0, 1.3, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0],
            },
        ),
        last=131072,
    ),
    Family(
        "gemma",
        "gemma",
        dict(
            max_position_embeddings=8192, head_dim=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        ),
        last=8192,
        sizes=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
        ),
    ),
    Family(
        "gpt-j",
        "gptj",
        dict(n_positions=16384, rotary_dim=8),
        last=16384,
        sizes=dict(n_embd=64, n_inner=128, n_layer=2, n_head=4),
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}
VOCAB = 128


def build(family: Family, seed: int = 0):
    """(model float32 eval, config) with random weights and q/k scaled by QK_SCALE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family.model_type, vocab_size=VOCAB, **family.sizes, **copy.deepcopy(family.config))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("q_proj.weight", "k_proj.weight")):
                param.mul_(QK_SCALE)
            elif "query_key_value.weight" in name:  # GPT-NeoX: q, k, v interleaved per head
                heads = cfg.num_attention_heads
                w = param.view(heads, 3, -1, param.shape[-1])
                w[:, :2] *= QK_SCALE
    return model, cfg


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def export(model, path: Path, mrope: bool = False) -> Path:
    """(input_ids (B, S), position_ids (B, S), or (3, B, S) with `mrope`: a VL model's text path) -> logits."""
    ids = torch.zeros(2, 8, dtype=torch.long)
    pos, axes = torch.arange(8)[None].repeat(2, 1), {0: "B", 1: "S"}  # (B, S)
    if mrope:
        pos, axes = pos[None].repeat(3, 1, 1), {1: "B", 2: "S"}  # (3, B, S)
    program = torch.onnx.export(
        Logits(model).eval(),
        (ids, pos),
        dynamo=True,
        input_names=["input_ids", "position_ids"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: "B", 1: "S"}, "position_ids": axes},
        verbose=False,
    )
    program.save(str(path))
    return path


def matmul_form_rotary(model) -> None:
    """Give the model's rotary module transformers 4.x's forward (`inv_freq_expanded @ position_ids_expanded`,
    the shape onnxscript's CosSinCacheFusion matches), in place."""
    rotary = model.model.rotary_emb

    def forward(x, position_ids):
        inv_freq = rotary.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)  # (B, R/2, 1)
        freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)  # (B, S, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, R)
        return (emb.cos() * rotary.attention_scaling).to(x.dtype), (emb.sin() * rotary.attention_scaling).to(x.dtype)

    rotary.forward = forward


def ort_fused(path: Path, out: Path, gqa: bool) -> Path:
    """onnxscript 0.7's ORT fusions of an exported model: `optimize_for_ort` (GroupQueryAttention with
    do_rotary where it fuses attention), or only its rotary and cos/sin-cache fusions
    (com.microsoft::RotaryEmbedding)."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding

    model = ir.load(path)
    if gqa:
        model, counts = optimize_for_ort(model)
        assert counts["gqa"] and counts["cos_sin_cache"], counts
    else:
        model = _core._pre_optimize(model)  # what optimize_for_ort runs first
        assert fuse_rotary_embedding(model) and fuse_cos_sin_cache(model)
        optimize(model)
    ir.save(model, out)
    return out


def genai_build(model, folder: Path, precision: str = "fp32", ep: str = "cpu") -> Path:
    """onnxruntime-genai's model builder (`precision` for the execution provider `ep`) run offline on
    `model` saved to a local folder with a tiny word-level tokenizer (the builder loads one); returns the
    built model.onnx (external data beside it) in `folder`/genai-`precision`-`ep` (fp32 cpu: `folder`/genai)."""
    import json
    import os
    import subprocess

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    checkpoint = folder / "checkpoint"
    out = folder / ("genai" if (precision, ep) == ("fp32", "cpu") else f"genai-{precision}-{ep}")
    model.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("rope_parameters", {}).get("rope_type") == "longrope":
        # The builder (0.18, builders/phi.py) reads rope_parameters["type"], the key Phi-3's published
        # configs carry in `rope_scaling`; transformers 5.23 writes only rope_type.
        config["rope_parameters"]["type"] = "longrope"
        (checkpoint / "config.json").write_text(json.dumps(config, indent=2))
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(
        checkpoint
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(checkpoint),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        ep,
        "-c",
        str(folder / "cache"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and (out / "model.onnx").is_file(), r.stdout[-2000:] + r.stderr[-2000:]
    return out / "model.onnx"


GENAI_QKV = "/model/layers.0/attn/qkv_proj/MatMul/output_0"  # the builder's packed QKV projection of layer 0


def genai_key_error(
    path: Path, positions: np.ndarray, rotate, qkv: str = GENAI_QKV, batch: int = 1, key_start: int = 64
):
    """(max abs error, in units of max|k|, of layer 0's rotated keys (present.0.key at `positions`, a past
    of zeros before them) against `rotate(k, positions)`, a float64 rotation of the same keys (the
    projection `qkv`, exposed as an output, read from `key_start`: packed QKV after the 4 x 16 query
    columns, or a k projection at 0), the logits) for a model onnxruntime-genai's builder wrote (4 heads
    and 2 kv heads of dim 16; GroupQueryAttention takes batch > 1 with a past only for one token)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    model.graph.output.add().name = qkv
    so = ort.SessionOptions()
    so.log_severity_level = 3
    tmp = Path(path).with_name("probe.onnx")
    onnx.save(model, tmp, save_as_external_data=True, location="probe.onnx.data")
    sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    past, S, kv, D = int(positions[0]), positions.size, 2, 16
    feed = {
        "input_ids": np.random.default_rng(0).integers(0, VOCAB, (batch, S)),
        "attention_mask": np.ones((batch, past + S), np.int64),
    }
    if "position_ids" in [i.name for i in sess.get_inputs()]:  # a model with RotaryEmbedding nodes (DML)
        feed["position_ids"] = np.broadcast_to(positions, (batch, S)).astype(np.int64)
    dtype = np.float16 if sess.get_inputs()[-1].type == "tensor(float16)" else np.float32  # the io dtype
    for i in (0, 1):
        for name in ("key", "value"):
            feed[f"past_key_values.{i}.{name}"] = np.zeros((batch, kv, past, D), dtype)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    k = out[qkv][..., key_start : key_start + kv * D].reshape(batch, S, kv, D).transpose(0, 2, 1, 3)  # (B, Hkv, S, D)
    k = k.astype(np.float64)
    err = np.abs(out["present.0.key"][:, :, past:] - rotate(k, positions)).max() / np.abs(k).max()
    return float(err), out["logits"]


DYNAMIC = Family(
    "llama-dynamic",
    "llama",
    dict(max_position_embeddings=4096, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
    last=16384,
    slow=False,
)


def export_frozen(model, path: Path) -> Path:
    """A dynamic-NTK model exported as an exporter that traces it freezes it: transformers' run-time
    update (`if seq_len > max_seq_len_cached`, data-dependent: torch.export refuses it) skipped, so the
    graph holds the example's branch, the unscaled float32 inv_freq."""
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    saved = [m.rope_type for m in rotary]
    try:
        for m in rotary:
            m.rope_type = "default"  # the decorator's switch: "dynamic" in rope_type
        return export(model, path)
    finally:
        for m, t in zip(rotary, saved):
            m.rope_type = t


def save_config(cfg, folder: Path) -> Path:
    cfg.save_pretrained(folder)
    return folder / "config.json"


# --- the float64 oracle -----------------------------------------------------------------------------


class _Float64Torch(types.ModuleType):
    """`torch` with `float` and `float32` meaning float64, for running transformers' rope-init functions."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        if name in ("float", "float32"):
            return torch.float64
        return getattr(torch, name)


def float64_rope_init(rotary, cfg, seq_len=None):
    """(inv_freq float64 (R/2,), attention_factor) from transformers' own init function, in float64."""
    from transformers import modeling_rope_utils

    rope_type = rotary.rope_type
    if rope_type == "default":
        fn = type(rotary).compute_default_rope_parameters
        modules = [sys.modules[type(rotary).__module__]]
    else:
        fn = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]
        modules = [modeling_rope_utils]
    saved = [m.torch for m in modules]
    try:
        for m in modules:
            m.torch = _Float64Torch()
        inv_freq, factor = fn(cfg, seq_len=seq_len) if seq_len is not None else fn(cfg)
    finally:
        for m, t in zip(modules, saved):
            m.torch = t
    assert inv_freq.dtype == torch.float64, inv_freq.dtype
    return inv_freq, float(factor)


class Float64Rotary(torch.nn.Module):
    """transformers' rotary forward in float64 (LongRoPE: long factors when max(position) + 1 exceeds the
    original length, as transformers' `longrope_frequency_update`; dynamic NTK: the frequencies for
    max(position) + 1 above max_position_embeddings, as `dynamic_frequency_update` on a fresh module)."""

    def __init__(self, rotary, cfg):
        super().__init__()
        self.short, self.factor = float64_rope_init(rotary, cfg)
        self.long = None
        if rotary.rope_type == "longrope":
            self.original = (
                cfg.rope_parameters.get("original_max_position_embeddings") or cfg.original_max_position_embeddings
            )
            self.long, _ = float64_rope_init(rotary, cfg, seq_len=self.original + 1)

        self.dynamic = (rotary, cfg) if rotary.rope_type == "dynamic" else None

    def forward(self, x, position_ids):
        inv_freq = self.short
        if self.long is not None and int(position_ids.max()) + 1 > self.original:
            inv_freq = self.long
        seq_len = int(position_ids.max()) + 1
        if self.dynamic is not None and seq_len > self.dynamic[1].max_position_embeddings:  # a fresh module's growth
            inv_freq, _ = float64_rope_init(*self.dynamic, seq_len=seq_len)
        freqs = position_ids[..., None].double() * inv_freq  # (B, S, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, R)
        return (emb.cos() * self.factor).to(x.dtype), (emb.sin() * self.factor).to(x.dtype)


def gptj_table64(num_pos: int, dim: int) -> torch.Tensor:
    """GPT-J's `create_sinusoidal_positions` in float64: (P, R) = [sin | cos]."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = np.arange(num_pos, dtype=np.float64)[:, None] * inv_freq
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))


def oracle(model, cfg):
    """The same model in float64 with float64 RoPE (rebuilt from the config and the weights: an exported
    model may hold the exporter's fake tensors, e.g. LongRoPE's cached `long_inv_freq`)."""
    from transformers import AutoModelForCausalLM

    m64 = AutoModelForCausalLM.from_config(cfg)
    m64.load_state_dict(model.state_dict())
    m64 = m64.double().eval()
    for name, module in list(m64.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent = m64.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m64
            setattr(parent, name.rsplit(".", 1)[-1], Float64Rotary(module, cfg))
        if hasattr(module, "embed_positions"):  # GPT-J attention
            module.embed_positions = gptj_table64(module.embed_positions.shape[0], module.embed_positions.shape[1])
    return m64


def inputs(batch: int, positions: np.ndarray, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    positions = np.asarray(positions, dtype=np.int64)
    return {
        "input_ids": rng.integers(0, VOCAB, (batch, positions.size), dtype=np.int64),
        "position_ids": np.repeat(positions[None], batch, axis=0),
    }


def oracle_logits(m64, feed: dict) -> np.ndarray:
    with torch.no_grad():
        out = m64(
            input_ids=torch.from_numpy(feed["input_ids"]),
            position_ids=torch.from_numpy(feed["position_ids"]),
            use_cache=False,
        )
    return out.logits.numpy()


def ort_outputs(path_or_bytes, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(
        str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes, so, providers=["CPUExecutionProvider"]
    )
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    return sess.run(None, feed)


def ort_logits(path_or_bytes, feed: dict) -> np.ndarray:
    return ort_outputs(path_or_bytes, feed)[0]


def errors(original: Path, rewritten: Path, m64, last: int, window: int = 64, batch: int = 1) -> dict:
    """Max abs logits error of both files against the float64 oracle at positions [0, window) and the
    last `window` positions before `last`."""
    out = {}
    for where, positions in (("start", np.arange(window)), ("end", np.arange(last - window, last))):
        feed = inputs(batch, positions)
        truth = oracle_logits(m64, feed)
        for kind, path in (("original", original), ("rewritten", rewritten)):
            out[f"{kind}_{where}"] = float(np.abs(ort_logits(path, feed) - truth).max())
    return out


# --- a decoder layer with a KV cache --------------------------------------------------------------

CACHED = Family(
    "llama-kv",
    "llama",
    dict(max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    last=32768,
    slow=False,
    sizes=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
    ),
)


class CachedAttention(torch.nn.Module):
    """One attention layer with a KV cache, written like transformers' Llama attention (its rotary module
    and `apply_rotary_pos_emb`): (input_ids (B, S), position_ids (B, S), past_key, past_value (B, H, T, D))
    -> (logits (B, S, V), present_key, present_value (B, H, T + S, D)). The new tokens attend to the whole
    cache and causally to each other."""

    def __init__(self, cfg):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        super().__init__()
        self.heads, self.dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        width = self.heads * self.dim
        self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.q, self.k, self.v = (torch.nn.Linear(cfg.hidden_size, width, bias=False) for _ in range(3))
        self.o = torch.nn.Linear(width, cfg.hidden_size, bias=False)
        self.head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(cfg)

    def forward(self, input_ids, position_ids, past_key, past_value):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        h = self.embed(input_ids)  # (B, S, E)
        B, S = input_ids.shape
        cos, sin = self.rotary_emb(h, position_ids)  # (B, S, R)
        split = lambda t: t.view(B, S, self.heads, self.dim).transpose(1, 2)  # noqa: E731  (B, H, S, D)
        q, k = apply_rotary_pos_emb(split(self.q(h)), split(self.k(h)), cos, sin)
        k = torch.cat([past_key, k], dim=2)  # (B, H, T + S, D)
        v = torch.cat([past_value, split(self.v(h))], dim=2)
        T = k.shape[2] - S
        scores = q @ k.transpose(-1, -2) / self.dim**0.5  # (B, H, S, T + S)
        future = torch.arange(T + S)[None, :] > (T + torch.arange(S))[:, None]  # (S, T + S)
        scores = scores.masked_fill(future, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, -1)  # (B, S, H*D)
        return self.head(h + self.o(y)), k, v


def build_cached(seed: int = 0):
    """(CachedAttention float32 eval, config) with random weights, q/k scaled by QK_SCALE."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(CACHED.model_type, vocab_size=VOCAB, **CACHED.sizes, **copy.deepcopy(CACHED.config))
    torch.manual_seed(seed)
    model = CachedAttention(cfg).eval()
    with torch.no_grad():
        model.q.weight.mul_(QK_SCALE)
        model.k.weight.mul_(QK_SCALE)
    return model, cfg


def export_cached(model, path: Path) -> Path:
    B, S, T = 2, 3, 5
    H, D = model.heads, model.dim
    args = (
        torch.zeros(B, S, dtype=torch.long),
        torch.arange(T, T + S)[None].repeat(B, 1),
        torch.zeros(B, H, T, D),
        torch.zeros(B, H, T, D),
    )
    dyn = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        input_names=["input_ids", "position_ids", "past_key", "past_value"],
        output_names=["logits", "present_key", "present_value"],
        dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 2: dyn}, {0: dyn, 2: dyn}),
        verbose=False,
    )
    program.save(str(path))
    return path


def cached_oracle(model, cfg):
    """The same layer in float64 with float64 RoPE (Float64Rotary)."""
    m64 = copy.deepcopy(model).double()
    m64.rotary_emb = Float64Rotary(model.rotary_emb, cfg)
    return m64


def run_cached(m, feed: dict) -> list[np.ndarray]:
    dtype = next(m.parameters()).dtype
    with torch.no_grad():
        out = m(
            torch.from_numpy(feed["input_ids"]),
            torch.from_numpy(feed["position_ids"]),
            torch.from_numpy(feed["past_key"]).to(dtype),
            torch.from_numpy(feed["past_value"]).to(dtype),
        )
    return [o.numpy() for o in out]
