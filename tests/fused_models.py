"""Small graphs holding one fused RoPE node each, with float32 (P, R/2) caches built as onnxruntime-genai's
model builder builds them (torch float32: `outer(arange(P).float(), inv_freq)`, then cos/sin), and their
float64 oracle written out from the formula (rotate-half pairs (i, i + R/2)).

    FUSED["com.microsoft::RotaryEmbedding"]  x (B, H, S, D), position_ids (B, S) -> y
    FUSED["ai.onnx::RotaryEmbedding"]         the same, opset 23 (caches before position_ids)
    FUSED["com.microsoft::GroupQueryAttention"] query (B, S, H*D), key/value (B, S, Hkv*D), past (B, Hkv, T, D),
        seqlens_k (B,) int32, total_sequence_length () int32 -> output, present_key, present_value
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

B, H, HKV, R = 1, 2, 1, 16  # batch, heads, kv heads, head dim (= rotary dim)


@dataclass(frozen=True)
class Rope:
    theta: float = 10000.0
    rows: int = 32768
    factor: float = 1.0  # the attention factor baked into the caches (YaRN's mscale)
    interleaved: int = 0
    computed: bool = (
        False  # the caches computed in the graph, as onnxscript's CosSinCacheFusion writes them for a run-time length
    )


def inv_freq64(theta: float, dim: int = R) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # (R/2,)


def caches32(rope: Rope) -> tuple[np.ndarray, np.ndarray]:
    """(P, R/2) float32 cos and sin as onnxruntime-genai 0.18 builds them (torch float32 throughout)."""
    import torch

    inv = 1.0 / (rope.theta ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))
    freqs = torch.outer(torch.arange(rope.rows, dtype=torch.int64).float(), inv)  # (P, R/2)
    return (freqs.cos() * rope.factor).numpy(), (freqs.sin() * rope.factor).numpy()


def rotate64(x: np.ndarray, positions: np.ndarray, theta: float, factor: float = 1.0) -> np.ndarray:
    """x (B, H, S, R) rotated in float64 at positions (S,), halves pairing."""
    ang = positions[:, None].astype(np.float64) * inv_freq64(theta)  # (S, R/2)
    c, s = np.cos(ang) * factor, np.sin(ang) * factor
    x = x.astype(np.float64)
    a, b = x[..., : R // 2], x[..., R // 2 :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def _initializers(rope: Rope):
    cos, sin = caches32(rope)
    return [onnx.numpy_helper.from_array(cos, "cos_cache"), onnx.numpy_helper.from_array(sin, "sin_cache")]


def _computed(positions: str, theta: float):
    """onnxscript's in-graph cache: Range(0, ReduceMax(positions) + 1) -> Reshape(-1, 1) -> Cast
    -> MatMul(inv_freq (1, R/2)) -> Cos, Sin."""
    import torch

    inv = (
        (1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))).numpy().reshape(1, -1)
    )  # transformers' float32
    c = lambda name, v: onnx.numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [c("inv_freq", inv), c("zero", np.int64(0)), c("one", np.int64(1)), c("col", np.array([-1, 1], np.int64))]
    nodes = [
        h.make_node("ReduceMax", [positions], ["pmax"], keepdims=0),
        h.make_node("Add", ["pmax", "one"], ["n"]),
        h.make_node("Range", ["zero", "n", "one"], ["range"]),
        h.make_node("Reshape", ["range", "col"], ["range2"]),
        h.make_node("Cast", ["range2"], ["rangef"], to=T.FLOAT),
        h.make_node("MatMul", ["rangef", "inv_freq"], ["angles"]),
        h.make_node("Cos", ["angles"], ["cos_cache"]),
        h.make_node("Sin", ["angles"], ["sin_cache"]),
    ]
    return nodes, inits


def rotary_contrib(rope: Rope) -> onnx.ModelProto:
    node = h.make_node(
        "RotaryEmbedding",
        ["x", "position_ids", "cos_cache", "sin_cache"],
        ["y"],
        domain="com.microsoft",
        interleaved=rope.interleaved,
        num_heads=H,
    )
    return _model(
        [node],
        rope,
        [
            h.make_tensor_value_info("x", T.FLOAT, ["B", H, "S", R]),
            h.make_tensor_value_info("position_ids", T.INT64, ["B", "S"]),
        ],
        ["y"],
        opset=20,
    )


def rotary_standard(rope: Rope) -> onnx.ModelProto:
    node = h.make_node(
        "RotaryEmbedding", ["x", "cos_cache", "sin_cache", "position_ids"], ["y"], interleaved=rope.interleaved
    )
    return _model(
        [node],
        rope,
        [
            h.make_tensor_value_info("x", T.FLOAT, ["B", H, "S", R]),
            h.make_tensor_value_info("position_ids", T.INT64, ["B", "S"]),
        ],
        ["y"],
        opset=23,
    )


GQA_INPUTS = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"]


def gqa(rope: Rope) -> onnx.ModelProto:
    node = h.make_node(
        "GroupQueryAttention",
        [*GQA_INPUTS, "cos_cache", "sin_cache"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=H,
        kv_num_heads=HKV,
        do_rotary=1,
        rotary_interleaved=rope.interleaved,
    )
    past = ["B", HKV, "T", R]
    inputs = [
        h.make_tensor_value_info("query", T.FLOAT, ["B", "S", H * R]),
        h.make_tensor_value_info("key", T.FLOAT, ["B", "S", HKV * R]),
        h.make_tensor_value_info("value", T.FLOAT, ["B", "S", HKV * R]),
        h.make_tensor_value_info("past_key", T.FLOAT, past),
        h.make_tensor_value_info("past_value", T.FLOAT, past),
        h.make_tensor_value_info("seqlens_k", T.INT32, ["B"]),
        h.make_tensor_value_info("total_sequence_length", T.INT32, []),
    ]
    return _model([node], rope, inputs, ["output", "present_key", "present_value"], opset=20)


def _model(nodes, rope: Rope, inputs, outputs, opset: int) -> onnx.ModelProto:
    inits = _initializers(rope)
    if rope.computed:
        more, inits = _computed("position_ids", rope.theta)
        nodes = more + nodes
    graph = h.make_graph(
        nodes, "fused_rope", inputs, [h.make_tensor_value_info(o, T.FLOAT, None) for o in outputs], inits
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset), h.make_opsetid("com.microsoft", 1)])


FUSED = {
    "com.microsoft::RotaryEmbedding": rotary_contrib,
    "ai.onnx::RotaryEmbedding": rotary_standard,
    "com.microsoft::GroupQueryAttention": gqa,
}


def config(folder: Path, rope: Rope = Rope(), **rope_parameters) -> Path:
    """A local config.json (Llama layout) for the fused graphs' RoPE."""
    params = {"rope_type": "default", "rope_theta": rope.theta, **rope_parameters}
    cfg = {
        "model_type": "llama",
        "head_dim": R,
        "hidden_size": H * R,
        "num_attention_heads": H,
        "num_key_value_heads": HKV,
        "max_position_embeddings": rope.rows,
        "rope_parameters": params,
    }
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def rotated(kind: str, model: bytes, positions: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rotated q-or-k (B, H, S, R) the model computes at contiguous `positions`, its input x (B, H, S, R))."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    S = positions.size
    if kind.endswith("GroupQueryAttention"):
        past = int(positions[0])  # GQA's positions: past length + s
        key = rng.standard_normal((B, S, HKV * R)).astype(np.float32)
        feed = {
            "query": rng.standard_normal((B, S, H * R)).astype(np.float32),
            "key": key,
            "value": rng.standard_normal((B, S, HKV * R)).astype(np.float32),
            "past_key": np.zeros((B, HKV, past, R), np.float32),
            "past_value": np.zeros((B, HKV, past, R), np.float32),
            "seqlens_k": np.full((B,), past + S - 1, np.int32),
            "total_sequence_length": np.array(past + S, np.int32),
        }
        present_key = sess.run(["present_key"], feed)[0]  # (B, HKV, T + S, R): the rotated keys appended
        return present_key[:, :, past:], key.reshape(B, S, HKV, R).transpose(0, 2, 1, 3)
    x = rng.standard_normal((B, H, S, R)).astype(np.float32)
    return sess.run(None, {"x": x, "position_ids": positions[None].astype(np.int64)})[0], x
