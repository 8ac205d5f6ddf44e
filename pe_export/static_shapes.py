"""Static shapes (`Spec.static_shapes`): fixed batch and lengths for runtimes that need them (NPUs);
the exported graph has no symbolic dim. Per contract:
    rotary     [B, S, H]: x (B, H, S, D) or (B, S, H, D), position_ids (B, S); H is x's heads axis
    absolute   [B, S]: position_ids (B, S)
    bias       [1, S]: Q = K = S; the bias has no batch axis, so B must be 1
    attention  [B, S]: query, key, value (B, heads, S, D), Q = K = S (heads are a parameter already)
`fit_probes` re-cuts verification probes to exactly those shapes.
"""

from __future__ import annotations

import numpy as np

from pe_export.encodings.attention import encoding_for
from pe_export.errors import BadInput
from pe_export.spec import check_static_shapes


def parse_static_shapes(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        raise BadInput(f"--static-shapes takes comma-separated integers B,S (B,S,H for RoPE), got {text!r}") from None
    check_static_shapes(shape)
    return shape


def static_sizes(spec) -> dict:
    """{dim name of the contract: size} for a spec with static shapes, after checking them."""
    enc = encoding_for(spec)
    shape, P = spec.static_shapes, enc.params(**spec.params).max_positions
    want = {"rotary": "B,S,H", "absolute": "B,S", "bias": "1,S", "attention": "B,S"}[enc.kind]
    if len(shape) != len(want.split(",")):
        what = {"rotary": " (H: the heads axis of x)", "bias": " (a bias has no batch axis: B is 1)"}.get(enc.kind, "")
        raise BadInput(f"--static-shapes for a {enc.kind} graph is {want}{what}, got {','.join(map(str, shape))}")
    B, S = shape[0], shape[1]
    if enc.kind == "bias" and B != 1:
        raise BadInput(f"--static-shapes for a bias graph is 1,S: the bias (1, heads, S, S) has no batch axis; got B = {B}")
    if S > P:
        raise BadInput(f"--static-shapes: S must be <= the table length --seq {P}, got {S}")
    return {"batch": B, "seq": S, "q": S, "k": S, "heads": shape[2] if len(shape) > 2 else None}


def static_args(spec, args, dynamic, names):
    """Example inputs resized to the static shapes (their dynamic dims get the fixed sizes)."""
    import torch

    sizes = static_sizes(spec)
    out = []
    for arg, name in zip(args, names):
        shape = list(arg.shape)
        for axis, dim in (dynamic.get(name) or {}).items():
            if sizes.get(dim.__name__) is None:
                raise BadInput(f"--static-shapes cannot fix the {dim.__name__!r} axis of {spec.encoding}'s input {name!r}")
            shape[axis] = sizes[dim.__name__]
        out.append(torch.zeros(shape, dtype=arg.dtype))
    return tuple(out)


def symbolic_dims(model) -> list[str]:
    """The dim_params left on the graph's inputs and outputs (none for a static export)."""
    return [
        d.dim_param
        for v in [*model.graph.input, *model.graph.output]
        for d in v.type.tensor_type.shape.dim
        if d.dim_param or not d.HasField("dim_value")
    ]


# Probes of a static graph read at most this many elements of x per probe family: with many heads,
# reading every table row would otherwise cost P * H * D (gigabytes at 128k positions).
PROBE_BUDGET = 2**24


def windows(row: np.ndarray, S: int) -> list[np.ndarray]:
    """A 1D run of positions cut into windows of exactly S, the last one ending where the row ends
    (so the last table row stays in); a shorter row is repeated to length S."""
    if len(row) <= S:
        return [np.resize(row, S)]
    starts = list(range(len(row) - S, -1, -S))
    if starts[-1] != 0:
        starts.append(0)
    return [row[s : s + S] for s in reversed(starts)]


def resample(values: np.ndarray, shape) -> np.ndarray:
    """The probe's own random values, repeated or cut to `shape` (deterministic in the seed)."""
    return np.resize(values, shape).astype(values.dtype)


def thin(groups: list, cost: int) -> list:
    """Evenly spaced groups within PROBE_BUDGET, always keeping the last (it holds the last row)."""
    keep = max(1, PROBE_BUDGET // max(cost, 1))
    if len(groups) <= keep:
        return groups
    picked = np.unique(np.round(np.linspace(0, len(groups) - 1, keep)).astype(int))
    return [groups[i] for i in picked]


def fit_probes(spec, probes: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Re-cut each probe to the spec's static shapes (unchanged without them). Positions are cut into
    windows of S ending at each row's end (every row the probe read is still read, within
    PROBE_BUDGET), rows grouped by B; x and the attention inputs are the probe's own random values."""
    if not spec.static_shapes:
        return probes
    kind, sizes = encoding_for(spec).kind, static_sizes(spec)
    B, S, H = sizes["batch"], sizes["seq"], sizes["heads"]
    fitted = []
    for name, inputs in probes:
        if kind in ("rotary", "absolute"):
            rows = np.stack([w for row in inputs["position_ids"] for w in windows(row, S)])  # (N, S)
            groups = [np.resize(rows[i : i + B], (B, S)) for i in range(0, len(rows), B)]
            D = inputs["x"].shape[-1] if "x" in inputs else 1
            groups = thin(groups, B * S * (H or 1) * D)
            for i, ids in enumerate(groups):
                new = {"position_ids": ids}
                if "x" in inputs:
                    shape = (B, H, S, D) if spec.layout == "bhsd" else (B, S, H, D)
                    new = {"x": resample(inputs["x"], shape), **new}
                fitted.append((name if len(groups) == 1 else f"{name}.{i}", {k: new[k] for k in inputs}))
        elif kind == "bias":
            qs, ks = windows(inputs["query_positions"], S), windows(inputs["key_positions"], S)
            n = max(len(qs), len(ks))
            for i in range(n):
                new = {"query_positions": qs[i % len(qs)], "key_positions": ks[i % len(ks)]}
                fitted.append((name if n == 1 else f"{name}.{i}", new))
        else:  # attention: Q = K = S, the S positions that end at the probe's last key
            new = {}
            for k, v in inputs.items():
                if k.endswith("_positions"):
                    last = int(inputs["key_positions"][-1])
                    new[k] = np.arange(last - S + 1, last + 1, dtype=np.int64) if last + 1 >= S else np.arange(S, dtype=np.int64)
                else:
                    new[k] = resample(v, (B, v.shape[1], S, v.shape[3]))
            fitted.append((name, new))
    return fitted
