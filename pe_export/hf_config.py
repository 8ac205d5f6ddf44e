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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pe_export.errors import BadInput
from pe_export.scaling import SCALING_RULES, rule_params

# Scaling-block keys that are not rule parameters, and transformers' names for ours.
META_KEYS = {"type", "rope_type", "rope_theta", "partial_rotary_factor"}  # proportional takes the last itself
RENAMED = {"original_max_position_embeddings": "original_max_positions"}
# Phi-3's older name. ("mrope" only beside an `mrope_section`, which makes the export M-RoPE: see mrope_keys.)
ALIASES = {"su": "longrope"}
MROPE_KEYS = ("mrope_section", "mrope_interleaved")  # M-RoPE's own keys in the rope block


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


def rope_params_by_layer_type(path: Path, max_positions: int | None = None) -> dict[str, dict]:
    """{layer type: RoPE parameter dict}, one entry per distinct parameter set (`rope_layers_from_config`):
    Gemma 3 and ModernBERT give `sliding_attention` and `full_attention`, in either key style; a config with one
    set gives it under the key ""."""
    groups = rope_layers_from_config(path, max_positions)
    if len(groups.distinct()) == 1:
        return {"": next(iter(groups.rope.values()))}
    return {first: groups.rope[first] for first in groups.distinct()}


def mrope_keys(cfg: dict) -> tuple[dict, dict]:
    """M-RoPE's keys (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): `mrope_section` and `mrope_interleaved` in
    `rope_parameters` / `rope_scaling`, at the top level or under `text_config` (as Qwen2.5-VL and
    Qwen3-VL checkpoints nest them). Returns (the config to read the rest from: the text config merged
    over the top level where the block lives there, that block without the M-RoPE keys and with
    transformers' `rope_type` "mrope" read as "default"; {mrope_section, mrope_interleaved} or {})."""
    for where in (cfg, cfg.get("text_config")):
        if not isinstance(where, dict):
            continue
        key = "rope_parameters" if where.get("rope_parameters") is not None else "rope_scaling"
        block = where.get(key)
        if not isinstance(block, dict) or block.get("mrope_section") is None:
            continue
        section = block["mrope_section"]
        if not isinstance(section, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in section):
            raise BadInput(f"config key 'mrope_section' must be a list of 3 integers [t, h, w], got {section!r}")
        interleaved = block.get("mrope_interleaved", False)
        if not isinstance(interleaved, bool):
            raise BadInput(f"config key 'mrope_interleaved' must be true or false, got {interleaved!r}")
        rest = {k: v for k, v in block.items() if k not in MROPE_KEYS}
        for name in ("rope_type", "type"):
            if rest.get(name) == "mrope":
                rest[name] = "default"  # as Qwen2VLTextConfig does
        merged = {**cfg, **where, key: rest} if where is not cfg else {**cfg, key: rest}
        return merged, {"mrope_section": section, "mrope_interleaved": interleaved}
    return cfg, {}


def _params(cfg: dict, path: Path, max_positions: int | None) -> dict:
    cfg, mrope = mrope_keys(cfg)
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

    interleaved = (
        model_type == "gptj" or bool(cfg.get("rope_interleave")) or model_type.startswith(("deepseek", "llama4"))
    )
    config_positions = _first(cfg, ["max_position_embeddings", "n_positions"], int, least=1)
    params = dict(
        head_dim=head_dim,
        theta=theta,
        pairing="interleaved" if interleaved else "half",
        max_positions=_either(max_positions, config_positions, 2048),
    )
    if rotary_dim is not None and rotary_dim != head_dim:
        params["rotary_dim"] = rotary_dim
    params.update(_scaling(block, cfg, config_positions))
    params.update(mrope)
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


# ---- Per-layer RoPE: layer types with their own parameters, and layers without RoPE (NoPE) ----------------------
#
# Must match transformers 5.23: Gemma3TextConfig and ModernBertConfig (`layer_types`, `rope_parameters` keyed by
# layer type, their old keys and default thetas), SmolLM3Config and Llama4TextConfig (`no_rope_layers`: 1 = RoPE,
# 0 = NoPE, built from `no_rope_layer_interval` when absent).


@dataclass(frozen=True, kw_only=True)
class LayerFamily:
    """How a model family that keys RoPE by layer type writes its layers in a config.json.

    `pattern` names the old key that builds `layer_types` when the config has none, with its default, and
    `sliding` says whether layer `i` is a sliding one for that value. `thetas` gives each layer type's old theta key
    and its default (`default_theta`); `scaled` the layer types an old `rope_scaling` block applies to."""

    pattern: tuple[str, int]
    sliding: Callable[[int, int], bool]
    thetas: dict[str, tuple[str, float]]
    scaled: tuple[str, ...]


LAYER_FAMILIES = {
    # Gemma3TextConfig: every `sliding_window_pattern`-th layer (1-based) is full; rope_scaling on full only.
    "gemma3": LayerFamily(
        pattern=("sliding_window_pattern", 6),
        sliding=lambda i, n: bool((i + 1) % n),
        thetas={"sliding_attention": ("rope_local_base_freq", 10000.0), "full_attention": ("rope_theta", 1e6)},
        scaled=("full_attention",),
    ),
    # ModernBertConfig: layer 0 and every `global_attn_every_n_layers`-th are full; rope_scaling on both.
    "modernbert": LayerFamily(
        pattern=("global_attn_every_n_layers", 3),
        sliding=lambda i, n: bool(i % n),
        thetas={"sliding_attention": ("local_rope_theta", 10000.0), "full_attention": ("global_rope_theta", 160000.0)},
        scaled=("full_attention", "sliding_attention"),
    ),
}
FAMILY_OF = {"gemma3": "gemma3", "gemma3_text": "gemma3", "modernbert": "modernbert"}
# Families whose `no_rope_layers` may be absent (then built from `no_rope_layer_interval`, default 4).
NOPE_FAMILIES = {"smollm3", "llama4", "llama4_text"}
# The layer type of their RoPE layers where the config has no `layer_types` (Llama 4: chunked attention).
ROPE_LAYER_TYPE = {"llama4": "chunked_attention", "llama4_text": "chunked_attention"}


@dataclass(frozen=True, kw_only=True)
class RopeLayers:
    """The RoPE of every layer of a model: `rope` {layer type: RoPE parameter dict (as `RopeParams` takes it)},
    `layers` {layer type: indices of the layers that use it}, `nope` the indices of the layers without RoPE.

    A config with one parameter set gives it (`rope_params_from_config`'s dict) under each layer type of its RoPE
    layers (`layer_types`, or the family's own: SmolLM3 `full_attention`, Llama 4 `chunked_attention`), or under
    "" where the config names no layer types."""

    rope: dict[str, dict]
    layers: dict[str, tuple[int, ...]]
    nope: tuple[int, ...]

    @classmethod
    def from_pattern(cls, rope: dict[str, dict], pattern) -> RopeLayers:
        """From the layer type of each layer in order, None for a NoPE layer (a `LayeredPreset`'s data)."""
        layers = {name: tuple(i for i, t in enumerate(pattern) if t == name) for name in rope}
        return cls(rope=dict(rope), layers=layers, nope=tuple(i for i, t in enumerate(pattern) if t is None))

    def distinct(self) -> dict[str, list[str]]:
        """{first layer type of a distinct parameter set: every layer type with that set}, in `rope`'s order."""
        groups: dict[str, list[str]] = {}
        for name, params in self.rope.items():
            same = next((first for first in groups if self.rope[first] == params), None)
            groups.setdefault(same if same is not None else name, []).append(name)
        return groups

    def paths(self, path: Path) -> dict[str, Path]:
        """{first layer type of each distinct set: its file}: `path` itself for one set, else
        `<stem>-<layer_type><suffix>` beside it (gemma-rope.onnx -> gemma-rope-full_attention.onnx)."""
        groups = self.distinct()
        if len(groups) == 1:
            return {next(iter(groups)): path}
        return {first: path.with_name(f"{path.stem}-{first}{path.suffix}") for first in groups}


def rope_layers_from_config(path: Path, max_positions: int | None = None) -> RopeLayers:
    """Which RoPE parameters each layer of the model `path` describes uses, and which layers use none."""
    cfg = _text_config(read_config(path))
    n_layers = _first(cfg, ["num_hidden_layers"], int, least=1)
    nope = _nope_layers(cfg, n_layers)
    family = LAYER_FAMILIES.get(FAMILY_OF.get(cfg.get("model_type", "")))
    types = _layer_types(cfg, n_layers, family)
    block = cfg.get("rope_parameters")
    keyed = isinstance(block, dict) and bool(block) and all(isinstance(v, dict) for v in block.values())
    if family is None and not keyed:  # one parameter set, under each layer type its RoPE layers have
        params = _params(cfg, path, max_positions)
        if types is None and n_layers is not None and cfg.get("model_type", "") in NOPE_FAMILIES:
            types = [ROPE_LAYER_TYPE.get(cfg["model_type"], "full_attention")] * n_layers
        if types is None:
            used = tuple(i for i in range(n_layers or 0) if i not in nope)
            return RopeLayers(rope={"": params}, layers={"": used} if n_layers else {}, nope=tuple(nope))
        names = dict.fromkeys(t for i, t in enumerate(types) if i not in nope)
        layers = {name: tuple(i for i, t in enumerate(types) if t == name and i not in nope) for name in names}
        return RopeLayers(rope={name: params for name in names}, layers=layers, nope=tuple(nope))
    blocks = _family_blocks(cfg, family) if not keyed else block
    rope = {}
    # Without `layer_types` nor `num_hidden_layers`, which layer uses which set is unknown: every set, no layers.
    used = blocks if types is None else dict.fromkeys(t for i, t in enumerate(types) if i not in nope)
    for name in used:
        if name not in blocks:
            raise BadInput(
                f"config key 'rope_parameters' has no entry for layer type {name!r} (in 'layer_types'); "
                f"it has: {', '.join(blocks) or 'none'}"
            )
        sub = dict(blocks[name])
        if family is not None and sub.get("rope_theta") is None:
            key, default = family.thetas.get(name, ("rope_theta", 10000.0))
            sub["rope_theta"] = _either(_first(cfg, [key], least=0), default)
        rope[name] = _params({**cfg, "rope_parameters": sub}, path, max_positions)
    layers = {name: tuple(i for i, t in enumerate(types or []) if t == name and i not in nope) for name in rope}
    return RopeLayers(rope=rope, layers=layers, nope=tuple(nope))


def _text_config(cfg: dict) -> dict:
    """A multimodal config's `text_config` (Gemma 3, Llama 4) when the top level describes no attention."""
    text = cfg.get("text_config")
    attention = ("head_dim", "hidden_size", "num_attention_heads", "num_hidden_layers")
    if isinstance(text, dict) and not any(k in cfg for k in attention):
        return {**text, "model_type": text.get("model_type", f"{cfg.get('model_type', '')}_text")}
    return cfg


def _layer_types(cfg: dict, n_layers: int | None, family: LayerFamily | None) -> list[str] | None:
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise BadInput(f"config key 'layer_types' must be a list of layer type names, got {types!r}")
        if n_layers is not None and len(types) != n_layers:
            raise BadInput(
                f"config key 'layer_types' must have num_hidden_layers ({n_layers}) entries, got {len(types)}"
            )
        return types
    if family is None or n_layers is None:
        return None
    key, default = family.pattern
    every = _either(_first(cfg, [key], int, least=1), default)
    return ["sliding_attention" if family.sliding(i, every) else "full_attention" for i in range(n_layers)]


def _family_blocks(cfg: dict, family: LayerFamily) -> dict[str, dict]:
    """Old-style keys (top-level thetas, one `rope_scaling` block) as transformers converts them, per layer type."""
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise BadInput(f"config key 'rope_scaling' must be an object, got {scaling!r}")
    block = cfg.get("rope_parameters")
    if isinstance(block, dict) and block:  # a flat new-style block: transformers treats it as rope_scaling
        scaling = {**block, **scaling}
    out = {}
    for name in family.thetas:
        sub = {k: v for k, v in scaling.items() if k != "rope_theta"} if name in family.scaled else {}
        out[name] = {**sub, "rope_type": sub.get("rope_type") or sub.get("type") or "default"}
    return out


def _nope_layers(cfg: dict, n_layers: int | None) -> list[int]:
    """Indices of the layers that skip RoPE: where `no_rope_layers` (1 = RoPE, 0 = NoPE) holds 0. SmolLM3 and
    Llama 4 build the list from `no_rope_layer_interval` when it is absent (Llama 4 also when it is empty)."""
    flags = cfg.get("no_rope_layers")
    model_type = cfg.get("model_type", "")
    absent = flags is None or (flags == [] and model_type.startswith("llama4"))
    if absent and model_type not in NOPE_FAMILIES:
        return []
    if n_layers is None:
        raise BadInput("config key 'num_hidden_layers' is needed to place the NoPE layers ('no_rope_layers')")
    if absent:
        every = _either(_first(cfg, ["no_rope_layer_interval"], int, least=1), 4)
        flags = [int((i + 1) % every != 0) for i in range(n_layers)]
    if not isinstance(flags, list) or not all(f in (0, 1) and not isinstance(f, float) for f in flags):
        raise BadInput(f"config key 'no_rope_layers' must be a list of 1 (RoPE) and 0 (NoPE), got {flags!r}")
    if len(flags) < n_layers:
        raise BadInput(
            f"config key 'no_rope_layers' must have at least num_hidden_layers ({n_layers}) entries "
            f"(1: RoPE, 0: NoPE), got {len(flags)}"
        )
    return [i for i in range(n_layers) if not flags[i]]
