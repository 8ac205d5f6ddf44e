"""Each RoPE scaling rule's error at the end of its table: max abs error of the exported graph (ORT
CPU, `--op onnx`, fp32, x of 1 x 2 x 8 x D at the last 8 positions) against the float64 reference and
against transformers (its `ROPE_INIT_FUNCTIONS` inv_freq and attention factor, then its float32
forward: inv_freq @ positions, cos/sin, times the factor), in the default float64-angles mode and with
`--angles float32`. Prints a Markdown table. Needs the `test` extra (transformers is the oracle).

    python benchmarks/rules.py
"""

import dataclasses

import numpy as np
import onnxruntime as ort
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pe_export.encodings.attention import encoding_for
from pe_export.encodings.rope import RopeParams, apply_torch
from pe_export.pipeline.onnx_export import build
from pe_export.presets import PRESETS
from pe_export.spec import Spec

HF_KEYS = {"original_max_positions": "original_max_position_embeddings"}


def hf_freqs(p: RopeParams, seq_len: int):
    """transformers' float32 inv_freq and attention factor for a call whose largest position is seq_len - 1."""
    rope = {"rope_type": p.scaling, "rope_theta": p.theta, "partial_rotary_factor": p.rotary_dim / p.head_dim}
    rope.update({HF_KEYS.get(k, k): v for k, v in p.scaling_params.items()})
    max_pos = p.max_positions
    if p.scaling == "dynamic":  # transformers scales from max_position_embeddings
        max_pos, seq_len = rope.pop("original_max_position_embeddings"), torch.tensor(seq_len)
    cfg = transformers.LlamaConfig(
        head_dim=p.head_dim,
        hidden_size=p.head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
    )
    if p.scaling == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[p.scaling](cfg, "cpu", seq_len=seq_len)


def run(spec, x, pos):
    data = build(spec).SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "position_ids": pos})[0].astype(np.float64)


def case(name, params, S=8, in_transformers=True):
    spec = Spec(encoding="rope", params=params, op="onnx", opset=23, dtype="fp32", layout="bhsd")
    p = RopeParams(**params)
    P = p.max_positions
    x = np.random.default_rng(0).standard_normal((1, 2, S, p.head_dim)).astype(np.float32)
    pos = np.arange(P - S, P, dtype=np.int64)[None]
    y = run(spec, x, pos)
    ref = encoding_for(spec).reference(spec, {"x": x, "position_ids": pos})
    cells = [f"{np.abs(y - ref).max():.1e}", "-", "-", "-"]
    if in_transformers:
        inv, scale = hf_freqs(p, P)
        f = (inv[None, :, None].float() @ torch.from_numpy(pos)[:, None, :].float()).transpose(
            1, 2
        )  # (1, S, R/2) float32
        cos, sin = (f.cos() * scale)[:, None], (f.sin() * scale)[:, None]
        hf = apply_torch(torch.from_numpy(x), cos, sin, interleaved=p.pairing == "interleaved", rotary_dim=p.rotary_dim)
        hf = hf.double().numpy()
        try:
            y32 = run(dataclasses.replace(spec, params={**params, "angles": "float32"}), x, pos)
            f32 = f"{np.abs(y32 - hf).max():.1e}"
        except ValueError:  # the in-graph dynamic rule refuses float32 angles
            f32 = "refused"
        cells[1:] = [f"{np.abs(y - hf).max():.1e}", f"{np.abs(hf - ref).max():.1e}", f32]
    print(f"| {name} | {P - 1} | {' | '.join(cells)} |", flush=True)


def pr(name, **kw):
    return {**PRESETS[name].params, **kw}


print(
    "| rule (case) | last position | ours vs float64 | ours vs transformers | transformers vs float64 | `--angles "
    "float32` vs transformers |"
)
print("|---|---|---|---|---|---|")
case("default (llama-rope)", pr("llama-rope"))
case(
    "ntk x4 (head 128, theta 1e4; not in transformers 5.23)",
    dict(head_dim=128, theta=10000.0, max_positions=16384, scaling="ntk", scaling_params=dict(factor=4.0)),
    in_transformers=False,
)
case(
    "linear x4 (head 128, theta 1e4)",
    dict(head_dim=128, theta=10000.0, max_positions=16384, scaling="linear", scaling_params=dict(factor=4.0)),
)
case(
    "dynamic x2 from 4096 (runtime)",
    dict(
        head_dim=128,
        theta=10000.0,
        max_positions=8192,
        scaling="dynamic",
        scaling_params=dict(factor=2.0, original_max_positions=4096),
    ),
)
case("llama3 (llama3.1-rope)", pr("llama3.1-rope"))
case("yarn (qwen2.5-yarn-rope)", pr("qwen2.5-yarn-rope"))
case("yarn + mscale, interleaved (deepseek-v3-rope)", pr("deepseek-v3-rope"))
case("longrope (phi3-mini-128k-rope, long factors)", pr("phi3-mini-128k-rope"))
case("longrope (phi3-mini-128k-rope, short factors)", pr("phi3-mini-128k-rope", max_positions=4096))
case(
    "proportional (head 256, partial 0.25, theta 1e6)",
    dict(
        head_dim=256,
        theta=1e6,
        max_positions=32768,
        scaling="proportional",
        scaling_params=dict(partial_rotary_factor=0.25),
    ),
)
