"""Static shapes (`Spec.static_shapes`): fixed batch and lengths for runtimes that need them (NPUs);
the exported graph has no symbolic dim. Per contract:
    rotary     [B, S, H]: x (B, H, S, D) or (B, S, H, D), position_ids (B, S); H is x's heads axis
    absolute   [B, S]: position_ids (B, S)
    bias       [1, S]: Q = K = S; the bias has no batch axis, so B must be 1
    attention  [B, S]: query, key, value (B, heads, S, D), Q = K = S (heads are a parameter already)
Each contract (pe_export.encodings.common) says its form and how `fit_probes` re-cuts verification
probes to exactly those shapes.
"""

from __future__ import annotations

from pe_export.encodings.attention import encoding_for
from pe_export.encodings.contracts import contract_of
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
    return contract_of(enc).static_sizes(spec.static_shapes, enc.parse(spec).max_positions)


def static_args(spec, args, dynamic, names):
    """Example inputs resized to the static shapes (their dynamic dims get the fixed sizes)."""
    import torch

    sizes = static_sizes(spec)
    out = []
    for arg, name in zip(args, names):
        shape = list(arg.shape)
        for axis, dim in (dynamic.get(name) or {}).items():
            if sizes.get(dim.__name__) is None:
                raise BadInput(
                    f"--static-shapes cannot fix the {dim.__name__!r} axis of {spec.encoding}'s input {name!r}"
                )
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


def fit_probes(spec, probes: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Re-cut each probe to the spec's static shapes (unchanged without them), as its contract does:
    positions cut into windows of S ending at each row's end (every row the probe read is still read,
    within PROBE_BUDGET), rows grouped by B; x and the attention inputs are the probe's own random values."""
    if not spec.static_shapes:
        return probes
    c, sizes = contract_of(encoding_for(spec)), static_sizes(spec)
    return [fitted for name, inputs in probes for fitted in c.fit(spec, sizes, name, inputs)]
