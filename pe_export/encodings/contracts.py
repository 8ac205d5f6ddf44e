"""The graph contracts encodings export to:

absolute   position_ids int64 (B, S) -> embeddings (B, S, dim)
bias       query_positions int64 (Q,), key_positions int64 (K,) -> bias (1, H, Q, K), added to logits
attention  query (B, H, Q, D), key (B, H, K, D), value (B, H, K, D)
           [, query_positions int64 (Q,), key_positions int64 (K,)] -> output (B, H, Q, D)
rotary     x, position_ids -> y (see rope.py)
mrotary    x, position_ids (3, B, S) (temporal, height, width) -> y (see mrope.py)"""

from __future__ import annotations

import math

import numpy as np

from pe_export.dtypes import torch_dtype
from pe_export.encodings import Encoding, parse
from pe_export.encodings.probes import (
    attention_io,
    attention_locate,
    attention_probes,
    bias_cases,
    dims,
    position_cases,
    resample,
    thin,
    windows,
)
from pe_export.encodings.table_reads import check_positions, guard, take
from pe_export.errors import BadInput


class Contract:
    kind = ""
    static_form = "B,S"  # what --static-shapes takes
    static_hint = ""  # said when the form is wrong

    def static_sizes(self, shape: list[int], P: int) -> dict:
        """{dim name: size} of fixed input sizes, after checking them against the form and the table."""
        if len(shape) != len(self.static_form.split(",")):
            raise BadInput(
                f"--static-shapes for a {self.kind} graph is {self.static_form}{self.static_hint}, got "
                f"{','.join(map(str, shape))}"
            )
        B, S = shape[0], shape[1]
        if S > P:
            raise BadInput(f"--static-shapes: S must be <= the table length --seq {P}, got {S}")
        return {"batch": B, "seq": S, "q": S, "k": S, "heads": shape[2] if len(shape) > 2 else None}

    def fit(self, spec, sizes: dict, name: str, inputs: dict) -> list[tuple[str, dict]]:
        """One probe re-cut to the static sizes: every position it read is still read, within PROBE_BUDGET."""
        raise NotImplementedError

    def user_probe(self, spec, template: dict, positions: np.ndarray, noise, batch: int) -> dict | None:
        """The probe `template` re-shaped to exactly `positions`; None when the graph takes no positions."""
        return None

    def position_grid(self, spec, inputs: dict) -> np.ndarray | None:
        """The table position of each output element, broadcastable to the output; None if none."""
        return None

    # Inside one softmax attention layer (`--attention`, pe_export.encodings.attention), as the
    # encoding's paper applies it. q, k, v (B, H, Q|K, D); query and key positions (Q,), (K,).
    def layer_check(self, name: str, layer) -> None:
        """Refuse layer parameters that do not apply to this kind."""
        if layer.attention_head_dim is not None:
            raise ValueError("attention_head_dim applies to bias encodings; the head dim here is the encoding's own")

    def layer_sizes(self, enc, p, layer) -> tuple:
        """(P, H, D, causal, scale) of the layer."""
        D = self.layer_head_dim(p)
        return p.max_positions, 3, D, bool(layer.attention_causal), 1.0 / math.sqrt(D)

    def layer_torch(self, inner, query, key, value, query_positions, key_positions) -> tuple:
        """(query, key, value, logits bias) after the encoding, in torch (the exported layer)."""
        raise NotImplementedError

    def layer_reference(self, enc, base, q, k, v, qp, kp) -> tuple:
        """float64 (q, k, v, logits bias, |q|, |k|, |v|) after the encoding, magnitudes bounding each."""
        raise NotImplementedError


class PositionIds(Contract):
    """absolute and rotary: position_ids (B, S) [and x], one position per token."""

    def fit(self, spec, sizes, name, inputs):
        B, S, H = sizes["batch"], sizes["seq"], sizes["heads"]
        rows = np.stack([w for row in inputs["position_ids"] for w in windows(row, S)])  # (N, S)
        groups = [np.resize(rows[i : i + B], (B, S)) for i in range(0, len(rows), B)]
        D = inputs["x"].shape[-1] if "x" in inputs else 1
        groups = thin(groups, B * S * (H or 1) * D)
        fitted = []
        for i, ids in enumerate(groups):
            new = {"position_ids": ids}
            if "x" in inputs:
                shape = (B, H, S, D) if spec.layout == "bhsd" else (B, S, H, D)
                new = {"x": resample(inputs["x"], shape), **new}
            fitted.append((name if len(groups) == 1 else f"{name}.{i}", {k: new[k] for k in inputs}))
        return fitted

    def user_probe(self, spec, template, positions, noise, batch):
        if "position_ids" not in template:
            return None
        n = len(positions)
        inputs = {"position_ids": np.broadcast_to(positions, (batch, n)).copy()}
        if "x" in template:
            B, H, _, D = template["x"].shape if spec.layout == "bhsd" else np.array(template["x"].shape)[[0, 2, 1, 3]]
            inputs = {"x": noise((batch, H, n, D) if spec.layout == "bhsd" else (batch, n, H, D)), **inputs}
        return {k: inputs[k] for k in template}


class Absolute(PositionIds):
    """position_ids int64 (B, S) -> embeddings (B, S, dim)."""

    kind = "absolute"

    def example_inputs(self, spec, P: int):
        import torch

        ids = torch.zeros((2, min(5, P)), dtype=torch.int64)
        return (ids,), {"position_ids": dims("batch", "seq")}, ["position_ids"], ["embeddings"]

    def probes(self, spec, rng, batch, P: int):
        return [(name, {"position_ids": ids}) for name, ids in position_cases(P, rng, batch)]

    def locate(self, spec, inputs, at) -> str:
        b, s, d = at
        return f"batch {b}, position {int(inputs['position_ids'][b, s])}, dim {d}"

    def position_grid(self, spec, inputs):
        return inputs["position_ids"][:, :, None] if "position_ids" in inputs else None

    # Vaswani; BERT, GPT-2: the embedding is added to query, key and value, as it is added to the
    # layer's input (input projections taken as identity, so head_dim = dim).
    def layer_head_dim(self, p) -> int:
        return p.dim

    def layer_torch(self, inner, query, key, value, query_positions, key_positions):
        query = query + inner(query_positions[None, :])[:, None]  # + (1, 1, Q, D)
        pe_k = inner(key_positions[None, :])[:, None]  # (1, 1, K, D)
        return query, key + pe_k, value + pe_k, 0.0

    def layer_reference(self, enc, base, q, k, v, qp, kp):
        pe_q = enc.reference(base, {"position_ids": qp[None, :]})[:, None]  # (1, 1, Q, D)
        pe_k = enc.reference(base, {"position_ids": kp[None, :]})[:, None]
        magnitudes = np.abs(q) + np.abs(pe_q), np.abs(k) + np.abs(pe_k), np.abs(v) + np.abs(pe_k)
        return (q + pe_q, k + pe_k, v + pe_k, 0.0, *magnitudes)


class Rotary(PositionIds):
    """x (B, H, S, D) or (B, S, H, D), position_ids (B, S) -> y like x (inputs and probes: rope.py)."""

    kind = "rotary"
    static_form = "B,S,H"
    static_hint = " (H: the heads axis of x)"

    def locate(self, spec, inputs, at) -> str:
        b, s = at[0], (at[2] if spec.layout == "bhsd" else at[1])
        return f"batch {b}, position {int(inputs['position_ids'][b, s])}, dim {at[-1]}"

    def position_grid(self, spec, inputs):
        if "position_ids" not in inputs:
            return None
        ids = inputs["position_ids"]
        return ids[:, None, :, None] if spec.layout == "bhsd" else ids[:, :, None, None]

    # RoPE: query and key are rotated at their positions.
    def layer_head_dim(self, p) -> int:
        return p.head_dim

    def layer_torch(self, inner, query, key, value, query_positions, key_positions):
        B = query.shape[0]
        query = inner(query, query_positions[None, :].expand(B, -1))
        return query, inner(key, key_positions[None, :].expand(B, -1)), value, 0.0

    def layer_reference(self, enc, base, q, k, v, qp, kp):
        B = q.shape[0]
        q_in = {"x": q, "position_ids": np.broadcast_to(qp, (B, len(qp)))}
        k_in = {"x": k, "position_ids": np.broadcast_to(kp, (B, len(kp)))}
        # |rotated| is bounded by the encoding's own magnitude.
        return (
            enc.reference(base, q_in),
            enc.reference(base, k_in),
            v,
            0.0,
            enc.magnitude(base, q_in),
            enc.magnitude(base, k_in),
            np.abs(v),
        )


class MRotary(Rotary):
    """x (B, H, S, D) or (B, S, H, D), position_ids (3, B, S) (temporal, height, width) -> y like x
    (inputs and probes: mrope.py). No --static-shapes and no --attention layer yet."""

    kind = "mrotary"

    def static_sizes(self, shape, P):
        raise BadInput("--static-shapes does not apply to mrope yet (position_ids (3, B, S)); drop it")

    def locate(self, spec, inputs, at) -> str:
        b, s = at[0], (at[2] if spec.layout == "bhsd" else at[1])
        t, h, w = (int(v) for v in inputs["position_ids"][:, b, s])
        return f"batch {b}, positions t {t} h {h} w {w}, dim {at[-1]}"

    def user_probe(self, spec, template, positions, noise, batch):
        probe = super().user_probe(
            spec, {**template, "position_ids": template["position_ids"][0]}, positions, noise, batch
        )
        return {
            **probe,
            "position_ids": np.broadcast_to(probe["position_ids"], (3, *probe["position_ids"].shape)).copy(),
        }

    def position_grid(self, spec, inputs):
        # The largest of the token's three positions: the row its error is reported at.
        return super().position_grid(spec, {"position_ids": inputs["position_ids"].max(axis=0)})

    def layer_check(self, name, layer):
        raise ValueError(f"{name} has no --attention layer yet (its positions are (3, B, S)); drop --attention")


class Bias(Contract):
    """query_positions int64 (Q,), key_positions int64 (K,) -> bias (1, H, Q, K), added to logits."""

    kind = "bias"
    static_form = "1,S"
    static_hint = " (a bias has no batch axis: B is 1)"

    def static_sizes(self, shape, P):
        if len(shape) == 2 and shape[0] != 1:
            raise BadInput(
                f"--static-shapes for a bias graph is 1,S: the bias (1, heads, S, S) has no batch axis; got B = "
                f"{shape[0]}"
            )
        return super().static_sizes(shape, P)

    def example_inputs(self, spec, P: int):
        import torch

        q, k = torch.zeros(min(3, P), dtype=torch.int64), torch.zeros(min(4, P), dtype=torch.int64)
        return (
            (q, k),
            {"query_positions": dims("q"), "key_positions": dims("k")},
            ["query_positions", "key_positions"],
            ["bias"],
        )

    def probes(self, spec, rng, batch, P: int):
        return [(name, {"query_positions": q, "key_positions": k}) for name, q, k in bias_cases(P, rng)]

    def locate(self, spec, inputs, at) -> str:
        _, h, i, j = at
        return (
            f"head {h}, query position {int(inputs['query_positions'][i])}, key position "
            f"{int(inputs['key_positions'][j])}"
        )

    def fit(self, spec, sizes, name, inputs):
        S = sizes["seq"]
        qs, ks = windows(inputs["query_positions"], S), windows(inputs["key_positions"], S)
        n = max(len(qs), len(ks))
        return [
            (name if n == 1 else f"{name}.{i}", {"query_positions": qs[i % len(qs)], "key_positions": ks[i % len(ks)]})
            for i in range(n)
        ]

    def user_probe(self, spec, template, positions, noise, batch):
        return {"query_positions": positions.copy(), "key_positions": positions.copy()}

    def position_grid(self, spec, inputs):
        return np.maximum(inputs["query_positions"][:, None], inputs["key_positions"][None, :])[None, None]

    # T5, ALiBi: the bias is added to the logits, softmax(q k^T * scale + bias) v, scale 1/sqrt(D) for
    # ALiBi and 1 for T5 (T5 folds it into its weights); causal by the encoding's own mode.
    def layer_check(self, name, layer):
        if layer.attention_causal is not None:
            raise ValueError(
                f"{name} sets causal masking by its own mode; attention_causal applies to absolute and rotary encodings"
            )
        if layer.attention_head_dim is not None and layer.attention_head_dim < 1:
            raise ValueError(f"attention_head_dim must be >= 1, got {layer.attention_head_dim}")

    def layer_sizes(self, enc, p, layer):
        D = layer.attention_head_dim or 64
        causal = bool(getattr(p, "causal", False)) or getattr(p, "bidirectional", True) is False
        return p.max_positions, p.heads, D, causal, (1.0 / math.sqrt(D) if enc.attention_scale else 1.0)

    def layer_torch(self, inner, query, key, value, query_positions, key_positions):
        return query, key, value, inner(query_positions, key_positions)  # (1, H, Q, K)

    def layer_reference(self, enc, base, q, k, v, qp, kp):
        bias = enc.reference(base, {"query_positions": qp, "key_positions": kp})
        return q, k, v, bias, np.abs(q), np.abs(k), np.abs(v)


class Attention(Contract):
    """query (B, H, Q, D), key (B, H, K, D), value (B, H, K, D) [, query_positions int64 (Q,),
    key_positions int64 (K,)] -> output (B, H, Q, D)."""

    kind = "attention"

    def example_inputs(self, spec, P: int, heads: int, head_dim: int, positions: bool = True):
        return attention_io(spec, P, heads, head_dim, positions)

    def probes(self, spec, rng, batch, P: int, heads: int, head_dim: int, positions: bool = True):
        return attention_probes(spec, rng, batch, P, heads, head_dim, positions)

    def locate(self, spec, inputs, at) -> str:
        return attention_locate(spec, inputs, at)

    def fit(self, spec, sizes, name, inputs):
        # Q = K = S, the S positions that end at the probe's last key.
        B, S = sizes["batch"], sizes["seq"]
        new = {}
        for k, v in inputs.items():
            if k.endswith("_positions"):
                last = int(inputs["key_positions"][-1])
                new[k] = (
                    np.arange(last - S + 1, last + 1, dtype=np.int64) if last + 1 >= S else np.arange(S, dtype=np.int64)
                )
            else:
                new[k] = resample(v, (B, v.shape[1], S, v.shape[3]))
        return [(name, new)]

    def user_probe(self, spec, template, positions, noise, batch):
        if "query_positions" not in template:
            return None
        _, H, _, D = template["query"].shape
        qkv = {name: noise((batch, H, len(positions), D)) for name in ("query", "key", "value")}
        return {
            k: ({**qkv, "query_positions": positions.copy(), "key_positions": positions.copy()})[k] for k in template
        }

    def position_grid(self, spec, inputs):
        return inputs["query_positions"][None, None, :, None] if "query_positions" in inputs else None


CONTRACTS = {c.kind: c for c in (Absolute(), Bias(), Attention(), Rotary(), MRotary())}


def contract_of(enc: Encoding) -> Contract:
    return CONTRACTS[enc.kind]


def contract(kind: str, params: type, positions: bool = True) -> dict:
    """The Encoding fields a contract fixes (kind, example_inputs, probes, locate), sized from the
    encoding's parameters: `max_positions`, and `heads` and `head_dim` for an attention layer."""
    c = CONTRACTS[kind]

    def sizes(spec):
        p = parse(params, spec)
        return (p.max_positions,) if kind != "attention" else (p.max_positions, p.heads, p.head_dim)

    extra = {} if kind != "attention" else {"positions": positions}
    return dict(
        kind=kind,
        example_inputs=lambda spec: c.example_inputs(spec, *sizes(spec), **extra),
        probes=lambda spec, rng, batch=2: c.probes(spec, rng, batch, *sizes(spec), **extra),
        locate=c.locate,
    )


def table_encoding(name: str, params: type, table, reference_impl: str) -> Encoding:
    """An absolute encoding that is one float64 (max_positions, dim) table read at the positions:
    `table(params)` builds it; the graph is a guarded Gather of it, cast once to the export dtype."""

    def module(spec):
        import torch

        p = parse(params, spec)

        class Table(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("table", torch.from_numpy(table(p)).to(torch_dtype(spec.dtype)))  # (P, dim)

            def forward(self, position_ids):  # (B, S) -> (B, S, dim)
                return take(self.table, guard(position_ids, p.max_positions))

        return Table().eval()

    def reference(spec, inputs):
        p = parse(params, spec)
        ids = inputs["position_ids"]
        check_positions(ids, p.max_positions)
        return table(p)[ids]

    return Encoding(
        name=name,
        params=params,
        module=module,
        reference=reference,
        magnitude=lambda spec, inputs: np.abs(reference(spec, inputs)),  # one rounding of each entry
        reference_impl=reference_impl,
        **contract("absolute", params),
    )
