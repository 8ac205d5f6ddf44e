"""`--attention`: any absolute, bias or rotary encoding inside one softmax attention layer, as its paper
applies it (the attention contract of common.py); each contract says what its encodings do there
(`layer_torch`, `layer_reference` in common.py):

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
from dataclasses import dataclass

import numpy as np

from pe_export.encodings import ENCODINGS, Encoding
from pe_export.encodings.bounds import attention_magnitude, softmax_np
from pe_export.encodings.contracts import CONTRACTS, contract_of

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
    c = contract_of(enc)  # what the encoding does inside the layer

    def check(spec):
        base, layer = split(spec)
        p = enc.parse(base)
        if hasattr(p, "role"):  # xPos: one module here would give queries and keys the same scale
            raise ValueError(
                f"{enc.name} treats queries and keys differently (role); export a query and a key graph instead of "
                f"--attention"
            )
        c.layer_check(enc.name, layer)
        return base, layer, p

    def sizes(spec):
        """(P, H, D, causal, scale)."""
        _, layer, p = check(spec)
        return c.layer_sizes(enc, p, layer)

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
                query, key, value, logits_bias = c.layer_torch(
                    self.inner, query, key, value, query_positions, key_positions
                )
                logits = (query @ key.transpose(-1, -2)) * scale + logits_bias  # (B, H, Q, K)
                if causal:
                    logits = logits.masked_fill(key_positions[None, :] > query_positions[:, None], float("-inf"))
                return torch.softmax(logits.float(), dim=-1).to(value.dtype) @ value  # (B, H, Q, D)

        return Attention().eval()

    def layer_inputs(spec, inputs):
        """float64 query, key, value after the encoding, the logits bias, and their magnitudes."""
        base, _, _ = check(spec)
        q, k, v = (np.asarray(inputs[n]).astype(np.float64) for n in ("query", "key", "value"))
        return c.layer_reference(enc, base, q, k, v, inputs["query_positions"], inputs["key_positions"])

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

    layer = CONTRACTS["attention"]

    def probes(spec, rng, batch=2):
        P, H, D, _, _ = sizes(spec)
        return layer.probes(spec, rng, batch, P, H, D)

    def example_inputs(spec):
        P, H, D, _, _ = sizes(spec)
        return layer.example_inputs(spec, P, H, D)

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
        locate=layer.locate,
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
