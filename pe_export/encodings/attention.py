"""`--attention`: any absolute, bias or rotary encoding inside one softmax attention layer, as its paper
applies it (the attention contract of common.py):

    absolute  (Vaswani; BERT, GPT-2) the embedding is added to query, key and value, as it is added to the
              layer's input (input projections taken as identity, so head_dim = dim): softmax(q'k'^T / sqrt(D)) v'
    bias      (T5, ALiBi) the bias is added to the logits: softmax(q k^T * scale + bias) v, scale 1/sqrt(D)
              for ALiBi and 1 for T5 (T5 folds it into its weights)
    rotary    (RoPE) query and key are rotated at their positions: softmax(q'k'^T / sqrt(D)) v

Keys after their query (key position > query position) are masked with -inf in causal mode: the bias
encodings' own mode (ALiBi `causal`, T5 `bidirectional` false), `attention_causal` for the others.
The encoding's own module and float64 reference are reused unchanged; this file only adds the layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from pe_export.encodings import ENCODINGS, Encoding
from pe_export.encodings.common import attention_io, attention_locate, attention_magnitude, attention_probes, softmax_np

LAYER_PARAMS = ("attention", "attention_head_dim", "attention_causal")


@dataclass(frozen=True, kw_only=True)
class LayerParams:
    attention: bool = True
    attention_head_dim: int | None = None  # bias encodings only: D of query and key (default 64)
    attention_causal: bool | None = None  # absolute and rotary only (bias encodings follow their own mode)


def split(spec):
    """(the encoding's own spec, the layer's parameters)."""
    base = dataclasses.replace(spec, params={k: v for k, v in spec.params.items() if k not in LAYER_PARAMS})
    return base, LayerParams(**{k: v for k, v in spec.params.items() if k in LAYER_PARAMS})


def as_attention(enc: Encoding) -> Encoding:
    def check(spec):
        base, layer = split(spec)
        p = enc.params(**base.params)
        if hasattr(p, "role"):  # xPos: one module here would give queries and keys the same scale
            raise ValueError(f"{enc.name} treats queries and keys differently (role); export a query and a key graph instead of --attention")
        if enc.kind == "bias":
            if layer.attention_causal is not None:
                raise ValueError(f"{enc.name} sets causal masking by its own mode; attention_causal applies to absolute and rotary encodings")
            if layer.attention_head_dim is not None and layer.attention_head_dim < 1:
                raise ValueError(f"attention_head_dim must be >= 1, got {layer.attention_head_dim}")
        elif layer.attention_head_dim is not None:
            raise ValueError("attention_head_dim applies to bias encodings; the head dim here is the encoding's own")
        return base, layer, p

    def sizes(spec):
        """(P, H, D, causal, scale)."""
        base, layer, p = check(spec)
        if enc.kind == "bias":
            D = layer.attention_head_dim or 64
            causal = bool(getattr(p, "causal", False)) or getattr(p, "bidirectional", True) is False
            return p.max_positions, p.heads, D, causal, (1.0 / math.sqrt(D) if enc.attention_scale else 1.0)
        D = p.dim if enc.kind == "absolute" else p.head_dim
        return p.max_positions, 3, D, bool(layer.attention_causal), 1.0 / math.sqrt(D)

    def params(**kwargs):  # validates like the encoding's own parameters, plus the layer's; returns the former
        from pe_export.spec import Spec

        return check(Spec(encoding=enc.name, params=kwargs))[2]

    def module(spec):
        import torch

        base, _, _ = check(spec)
        inner = enc.module(base)
        _, _, _, causal, scale = sizes(spec)

        class Attention(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, query, key, value, query_positions, key_positions):  # (B, H, Q|K, D), (Q,), (K,)
                logits_bias = 0.0
                if enc.kind == "absolute":
                    query = query + self.inner(query_positions[None, :])[:, None]  # + (1, 1, Q, D)
                    pe_k = self.inner(key_positions[None, :])[:, None]  # (1, 1, K, D)
                    key, value = key + pe_k, value + pe_k
                elif enc.kind == "rotary":
                    B = query.shape[0]
                    query = self.inner(query, query_positions[None, :].expand(B, -1))
                    key = self.inner(key, key_positions[None, :].expand(B, -1))
                else:
                    logits_bias = self.inner(query_positions, key_positions)  # (1, H, Q, K)
                logits = (query @ key.transpose(-1, -2)) * scale + logits_bias  # (B, H, Q, K)
                if causal:
                    logits = logits.masked_fill(key_positions[None, :] > query_positions[:, None], float("-inf"))
                return torch.softmax(logits.float(), dim=-1).to(value.dtype) @ value  # (B, H, Q, D)

        return Attention().eval()

    def layer_inputs(spec, inputs):
        """float64 query, key, value after the encoding, the logits bias, and their magnitudes."""
        base, _, _ = check(spec)
        q, k, v = (np.asarray(inputs[n]).astype(np.float64) for n in ("query", "key", "value"))
        qp, kp = inputs["query_positions"], inputs["key_positions"]
        bias, q_abs, k_abs, v_abs = 0.0, np.abs(q), np.abs(k), np.abs(v)
        if enc.kind == "absolute":
            pe_q = enc.reference(base, {"position_ids": qp[None, :]})[:, None]  # (1, 1, Q, D)
            pe_k = enc.reference(base, {"position_ids": kp[None, :]})[:, None]
            q_abs, k_abs, v_abs = q_abs + np.abs(pe_q), k_abs + np.abs(pe_k), v_abs + np.abs(pe_k)
            q, k, v = q + pe_q, k + pe_k, v + pe_k
        elif enc.kind == "rotary":
            B = q.shape[0]
            ids_q, ids_k = np.broadcast_to(qp, (B, len(qp))), np.broadcast_to(kp, (B, len(kp)))
            q_in, k_in = {"x": q, "position_ids": ids_q}, {"x": k, "position_ids": ids_k}
            q_abs, k_abs = enc.magnitude(base, q_in), enc.magnitude(base, k_in)  # bound |rotated|
            q, k = enc.reference(base, q_in), enc.reference(base, k_in)
        else:
            bias = enc.reference(base, {"query_positions": qp, "key_positions": kp})
        return q, k, v, bias, q_abs, k_abs, v_abs

    def logits_np(spec, inputs):
        _, _, D, causal, scale = sizes(spec)
        q, k, v, bias, q_abs, k_abs, v_abs = layer_inputs(spec, inputs)
        logits = q @ k.swapaxes(-1, -2) * scale + bias
        if causal:
            logits = np.where(inputs["key_positions"][None, :] > inputs["query_positions"][:, None], -np.inf, logits)
        logit_abs = q_abs @ k_abs.swapaxes(-1, -2) * scale + np.where(np.isfinite(bias), np.abs(bias), 0.0)
        return logits, v, logit_abs, v_abs, D

    def reference(spec, inputs):
        logits, v, *_ = logits_np(spec, inputs)
        return softmax_np(logits) @ v

    def magnitude(spec, inputs):
        logits, _, logit_abs, v_abs, D = logits_np(spec, inputs)
        # D products per logit, plus the bias or the encoding's own roundings (a rotation: 4 more).
        return attention_magnitude(softmax_np(logits), v_abs, logit_abs, terms=D + 6)

    def probes(spec, rng, batch=2):
        P, H, D, _, _ = sizes(spec)
        return attention_probes(spec, rng, batch, P, H, D)

    def example_inputs(spec):
        P, H, D, _, _ = sizes(spec)
        return attention_io(spec, P, H, D)

    return dataclasses.replace(
        enc,
        name=f"{enc.name} --attention",
        params=params,
        module=module,
        example_inputs=example_inputs,
        probes=probes,
        reference=reference,
        translation_table=lambda spec: enc.translation_table(split(spec)[0]),
        magnitude=magnitude,
        locate=attention_locate,
        derived=lambda spec: enc.derived(split(spec)[0]),
        kind="attention",
        layouts=("bhsd",),
    )


def encoding_for(spec) -> Encoding:
    """The encoding a spec exports: the registered one, or it inside an attention layer (`attention`)."""
    enc = ENCODINGS.get(spec.encoding)
    if spec.params.get("attention"):
        if enc.kind == "attention":
            raise ValueError(f"{enc.name} is an attention layer already; drop --attention")
        return as_attention(enc)
    return enc
