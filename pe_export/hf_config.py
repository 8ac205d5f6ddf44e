"""RoPE parameters from a local Hugging Face `config.json` (never downloaded: the user passes the file).

Reads what transformers 5.23 reads: `rope_theta`, `head_dim` or `hidden_size / num_attention_heads`,
`partial_rotary_factor` / `rotary_pct` / `rotary_dim`, `max_position_embeddings`, and the scaling block
under the new `rope_parameters` key or the old `rope_scaling` (`rope_type` or `type`), with
`original_max_position_embeddings` inside the block or at the top level (as Phi-3 keeps it). Family
quirks: GPT-NeoX's `rotary_emb_base`, GPT-J's `n_embd` / `n_head` / `n_positions` and hard-coded base
10000, interleaved pairing for GPT-J and for DeepSeek (`rope_interleave`, `qk_rope_head_dim`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pe_export.errors import BadInput
from pe_export.scaling import SCALING_RULES, rule_params

# Scaling-block keys that are not rule parameters, and transformers' names for ours.
META_KEYS = {"type", "rope_type", "rope_theta", "partial_rotary_factor"}  # proportional takes the last itself
RENAMED = {"original_max_position_embeddings": "original_max_positions"}
# Phi-3's older name. (Not "mrope": M-RoPE takes 3-D position ids, which plain RoPE would silently misread.)
ALIASES = {"su": "longrope"}
# M-RoPE's section keys (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): which of the (3, B, S) positions each rotary dim
# reads. A graph's per-position cos/sin do not depend on them (the graph selects the sections after Cos),
# so the rewriter reads such a config (`graph_keys`); an export of plain RoPE must not, and refuses them.
SECTION_KEYS = ("mrope_section", "mrope_interleaved")


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"config {str(path)!r} does not exist or is not a file")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise BadInput(f"config {str(path)!r} is not text") from None
    except json.JSONDecodeError as e:
        raise BadInput(
            f"config {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise BadInput(f"config {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _number(cfg: dict, key: str, kind=float, where: str = "config"):
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadInput(f"{where} key {key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise BadInput(f"{where} key {key!r} must be finite, got {value!r}")
    return kind(value)


def _first(cfg: dict, keys: list[str], kind=float, least=None):
    """The first of `keys` that `cfg` sets (not null), as a number of `kind`, refused below `least`
    (`> 0` for floats, `>= least` for ints); None when none is set. Zero is a value, not "unset"."""
    for key in keys:
        if cfg.get(key) is not None:
            value = _number(cfg, key, kind)
            if least is not None and (value < least if kind is int else value <= least):
                raise BadInput(f"config key {key!r} must be {'>=' if kind is int else '>'} {least}, got {value}")
            return value
    return None


def _either(*values):
    """The first value that is not None (so that a configured 0 is not replaced by a default)."""
    return next((v for v in values if v is not None), None)


def rope_params_from_config(path: Path, max_positions: int | None = None) -> dict:
    """The RoPE parameter dict (as `RopeParams` takes it) that `path` describes."""
    return _params(read_config(path), path, max_positions)


def rope_params_by_layer_type(path: Path, max_positions: int | None = None, graph_keys=()) -> dict[str, dict]:
    """{layer type: RoPE parameter dict}: one entry per key where `rope_parameters` is keyed by layer
    type (Gemma 3: `sliding_attention`, `full_attention`), else the one set under the key "". A
    multimodal config's `text_config` (Qwen2-VL) is read over its top level; scaling keys in
    `graph_keys` (SECTION_KEYS) are left to the graph."""
    cfg = read_config(path)
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    block = cfg.get("rope_parameters")
    if isinstance(block, dict) and block and all(isinstance(v, dict) for v in block.values()):
        return {
            name: _params({**cfg, "rope_parameters": sub}, path, max_positions, graph_keys)
            for name, sub in block.items()
        }
    return {"": _params(cfg, path, max_positions, graph_keys)}


def _params(cfg: dict, path: Path, max_positions: int | None, graph_keys=()) -> dict:
    model_type = cfg.get("model_type", "")
    block = cfg.get("rope_parameters") if cfg.get("rope_parameters") is not None else cfg.get("rope_scaling")
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise BadInput(f"config key 'rope_parameters' / 'rope_scaling' must be an object, got {block!r}")

    theta = (
        10000.0
        if model_type == "gptj"
        else _either(
            _first(block, ["rope_theta"], least=0), _first(cfg, ["rope_theta", "rotary_emb_base"], least=0), 10000.0
        )
    )
    head_dim = _first(cfg, ["qk_rope_head_dim", "head_dim"], int)
    if head_dim is None:
        hidden = _first(cfg, ["hidden_size", "n_embd", "d_model"], int)
        heads = _first(cfg, ["num_attention_heads", "n_head", "num_heads"], int)
        if hidden is None or heads is None:
            raise BadInput(f"config {str(path)!r} has no 'head_dim', nor 'hidden_size' and 'num_attention_heads'")
        if heads <= 0 or hidden % heads:
            raise BadInput(f"config 'hidden_size' {hidden} is not a multiple of 'num_attention_heads' {heads}")
        head_dim = hidden // heads

    rotary_dim = _first(cfg, ["rotary_dim"], int)
    if (block.get("rope_type") or block.get("type")) == "proportional":
        rotary_dim = head_dim  # its partial_rotary_factor is the rule's own parameter (see scaling/proportional.py)
    if rotary_dim is None:
        fraction = _either(
            _first(block, ["partial_rotary_factor"]), _first(cfg, ["partial_rotary_factor", "rotary_pct"])
        )
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise BadInput(f"config partial rotary factor must be in (0, 1], got {fraction}")
            rotary_dim = int(head_dim * fraction)

    interleaved = model_type == "gptj" or bool(cfg.get("rope_interleave")) or model_type.startswith("deepseek")
    config_positions = _first(cfg, ["max_position_embeddings", "n_positions"], int, least=1)
    params = dict(
        head_dim=head_dim,
        theta=theta,
        pairing="interleaved" if interleaved else "half",
        max_positions=_either(max_positions, config_positions, 2048),
    )
    if rotary_dim is not None and rotary_dim != head_dim:
        params["rotary_dim"] = rotary_dim
    params.update(_scaling({k: v for k, v in block.items() if k not in graph_keys}, cfg, config_positions))
    if params.get("scaling") == "dynamic" and max_positions is None and config_positions:
        # A table of max_position_embeddings would never scale: default to factor times it, as vLLM.
        params["max_positions"] = int(config_positions * params["scaling_params"].get("factor", 1))
    return params


def _scaling(block: dict, cfg: dict, config_positions: int | None) -> dict:
    name = block.get("rope_type") or block.get("type") or "default"
    name = ALIASES.get(name, name)
    if name not in SCALING_RULES.names():
        raise BadInput(f"unsupported rope_type {name!r}; supported: {', '.join(SCALING_RULES.names())}")
    takes = list(rule_params(name))
    params = {}
    for key, value in block.items():
        ours = RENAMED.get(key, key)
        if (key in META_KEYS and key not in takes) or value is None:
            continue
        if ours not in takes:
            raise BadInput(
                f"config scaling key {key!r} is not a parameter of rope_type {name!r}; it takes: "
                f"{', '.join(takes) or 'none'}"
            )
        where = f"rope_type {name!r}"
        if isinstance(value, list):  # LongRoPE's factor lists
            params[ours] = [_number({f"{key}[{i}]": v}, f"{key}[{i}]", where=where) for i, v in enumerate(value)]
        else:
            params[ours] = value if isinstance(value, bool) else _number(block, key, where=where)
    if name == "dynamic" and config_positions:
        # transformers' dynamic NTK scales from max_position_embeddings, whatever else the config says.
        params["original_max_positions"] = config_positions
    if "original_max_positions" in takes and "original_max_positions" not in params:
        if cfg.get("original_max_position_embeddings") is not None:
            params["original_max_positions"] = _number(cfg, "original_max_position_embeddings", int)
    if "original_max_positions" in params:
        params["original_max_positions"] = int(params["original_max_positions"])
    if (
        name in ("yarn", "longrope")
        and "factor" not in params
        and config_positions
        and "original_max_positions" in params
    ):
        params["factor"] = config_positions / params["original_max_positions"]  # transformers' fallback
    return {"scaling": name, "scaling_params": params} if name != "default" else {"scaling": "default"}
