"""The public functions a script imports from `pe_export` (the classes live in their own modules).

    preset(name, **overrides)        -> the preset's parameter dataclass (RopeParams for RoPE presets)
    rope_tables(params, dtype)       -> (cos, sin) torch tensors (P, R/2), float64-built, rounded once
    translation_table(op)            -> custom_translation_table for torch.onnx.export(dynamo=True)
                                        (defined beside the custom op, pe_export.custom_ops.rotary)

Bad input raises `BadInput` with the one-line message the CLI prints.
"""

from __future__ import annotations

import dataclasses

from pe_export.custom_ops.rotary import translation_table  # noqa: F401 (public)
from pe_export.dtypes import DTYPES, torch_dtype
from pe_export.encodings import ENCODINGS
from pe_export.encodings.rope import RopeParams, with_overrides
from pe_export.errors import BadInput
from pe_export.presets import PRESETS


def preset(name: str, **overrides):
    """The parameters of preset `name` with `overrides` applied and validated, e.g.
    `preset("llama3.1-rope", max_positions=32768)` -> RopeParams(head_dim=128, theta=500000.0, ...).
    RoPE overrides follow the CLI's rules (`pe_export.encodings.rope.with_overrides`): a new head_dim
    keeps a partial-rotary preset's fraction, a new scaling rule starts from no parameters."""
    if name not in PRESETS:
        raise BadInput(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    cls = ENCODINGS.get(p.encoding).params
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise BadInput(f"{p.encoding} has no parameter {unknown[0]!r}; it takes: {', '.join(sorted(fields))}")
    params = with_overrides(p.params, **overrides) if p.encoding in ("rope", "mrope") else {**p.params, **overrides}
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{name}: {e}") from None


def rope_tables(params: RopeParams, dtype: str = "fp32", seq_len: int | None = None):
    """(cos, sin), each a torch tensor (P, R/2) of `dtype`: built in float64, the attention factor
    applied, rounded once. `seq_len` picks the regime of a run-time rule (LongRoPE's long factors
    above its switch); None: the table for short calls."""
    import torch

    if not isinstance(params, RopeParams):
        raise BadInput(f"rope_tables takes RopeParams (pe_export.preset of a RoPE preset), got {type(params).__name__}")
    if dtype not in DTYPES:
        raise BadInput(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if params.runtime_frequencies():
        raise BadInput(
            f"{params.scaling!r} in mode 'runtime' has no table: its frequencies follow each call; use mode 'fixed'"
        )
    cos, sin = params.cos_sin(seq_len)
    return torch.from_numpy(cos).to(torch_dtype(dtype)), torch.from_numpy(sin).to(torch_dtype(dtype))


def rope_layers(source, max_positions: int | None = None):
    """The RoPE of every layer of a model, from a local config.json path or a layered preset name
    ("gemma3-rope", "modernbert-rope", "smollm3-rope", "llama4-rope"): a `RopeLayers` whose `rope` is
    {layer type: RopeParams} (e.g. {"sliding_attention": ..., "full_attention": ...}), `layers` {layer type:
    layer indices} and `nope` the indices of the layers without RoPE. A config with one parameter set gives
    {"": RopeParams} (what `rope_params_from_config` reads)."""
    from pathlib import Path

    from pe_export.hf_config import RopeLayers, rope_layers_from_config
    from pe_export.presets import LAYERED_PRESETS

    if isinstance(source, str) and source in LAYERED_PRESETS:
        p = LAYERED_PRESETS[source]
        found = RopeLayers.from_pattern(p.rope, p.pattern)
    elif isinstance(source, (str, Path)) and (str(source).endswith(".json") or Path(source).exists()):
        found = rope_layers_from_config(Path(source))
    else:
        raise BadInput(
            f"rope_layers takes a config.json path or a layered preset ({', '.join(LAYERED_PRESETS)}), got {source!r}"
        )
    rope = {}
    for name, params in found.rope.items():
        try:
            rope[name] = RopeParams(**with_overrides(params, max_positions=max_positions))
        except ValueError as e:
            raise BadInput(f"{name}: {e}" if name else str(e)) from None
    return dataclasses.replace(found, rope=rope)


def export_layers(source, path, max_positions: int | None = None, **options) -> dict:
    """Export and verify one file per distinct RoPE parameter set of `source` (as `rope_layers` takes it):
    {layer type: ExportResult}, the files named by `RopeLayers.paths` (`path` itself for one set, else
    `<stem>-<layer_type><suffix>`). Options as `pe_export.export`'s. Every output path is checked before
    the first file is written."""
    from pathlib import Path

    from pe_export.files import check_output_path
    from pe_export.pipeline.artifact import export

    found = rope_layers(source, max_positions)
    paths = found.paths(Path(path))
    for target in paths.values():
        check_output_path(target, options.get("force", False))
    return {first: export(found.rope[first], target, **options) for first, target in paths.items()}
