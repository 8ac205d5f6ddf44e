"""`pe_export.patch(model)`: exact RoPE tables inside a transformers model, before any exporter runs.

Replaces every rotary-embedding module of a transformers 5.x model (the `*RotaryEmbedding` modules whose
`forward(x, position_ids[, layer_type])` returns `(cos, sin)`, as `LlamaRotaryEmbedding` in
transformers 5.23 `models/llama/modeling_llama.py`) by a `PatchedRotary` that gathers rows of float64-built
tables held as buffers. What each replaced module returned, the replacement returns: cos and sin of shape
(B, S, R) (`cat(freqs, freqs)`, the layout transformers uses for every pairing, DeepSeek's interleaved
one included), attention factor applied, in `x.dtype`. So `torch.onnx.export(dynamo=True)`, optimum,
`torch.export` for ExecuTorch and LiteRT-torch all write exact tables instead of float32 angles.

Family behaviour (transformers 5.23):
    per layer type   Gemma 3's one module with `{layer_type}_inv_freq` buffers and a third argument
                     `layer_type`: one table pair per layer type
    LongRoPE         `longrope_frequency_update`: long factors when max(position_ids) + 1 exceeds
                     original_max_position_embeddings, else short; both tables kept, switched per call
    dynamic NTK      `dynamic_frequency_update`: frequencies recomputed from max(position_ids) + 1,
                     here in float64 per call with pe-export's own rule (no table; a fresh module's
                     behaviour, see pe_export/scaling/dynamic.py)
    M-RoPE           `Qwen2VLRotaryEmbedding.recomposition_frequencies`: position_ids (3, B, S) (or (B, S),
                     expanded); frequency block i of `mrope_section` reads position row i % 3

The tables come from pe-export's RoPE code (`pe_export.hf_config` reads the module's config,
`pe_export.encodings.rope.tables` builds them in float64). Nothing here imports transformers: rotary
modules are found by class name and interface. Before anything is swapped, each replacement is checked
against the module it replaces on positions 0-15; a config it cannot express raises `BadInput` and the
model is left as it was.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import numpy as np
import torch

from pe_export.encodings.rope import RopeParams, tables
from pe_export.errors import BadInput
from pe_export.hf_config import rope_params_from_dict
from pe_export.scaling import SCALING_RULES

CHECK_POSITIONS = 16  # positions compared with the original module before it is replaced
CHECK_TOLERANCE = 1e-4  # float32 angles at positions < 16 are within ~1e-6 of float64; a wrong table is not


class PatchedRotary(torch.nn.Module):
    """Drop-in for a transformers rotary module: `forward(x, position_ids, layer_type=None) -> (cos, sin)`.

    Buffers per layer type `t` ("" for a single one): `cos_t`/`sin_t` (P, R/2) float32, rounded once from
    float64 (with a LongRoPE switch: (2P, R/2), rows [P, 2P) the long regime). Dynamic NTK holds no table.
    """

    def __init__(self, params: dict[str, RopeParams], mrope_section: list[int] | None = None):
        super().__init__()
        self.params = params
        self.mrope_section = list(mrope_section) if mrope_section else None
        self.switch = {}
        self.attention_scaling = {}
        for name, p in params.items():
            self.attention_scaling[name] = p.frequencies()[1]
            if _computed_per_call(p):
                continue
            cos, sin = tables(p)  # (P, R/2) float64
            switch = getattr(SCALING_RULES.get(p.scaling), "switch", None)
            at = switch(**p.scaling_params) if switch else None
            if at is not None:
                cos_long, sin_long = tables(p, seq_len=at + 1)
                cos, sin = np.concatenate([cos, cos_long]), np.concatenate([sin, sin_long])  # (2P, R/2)
                self.switch[name] = at
            self.register_buffer(f"cos_{name}", torch.from_numpy(cos).float(), persistent=False)
            self.register_buffer(f"sin_{name}", torch.from_numpy(sin).float(), persistent=False)
        if len(params) == 1:  # transformers' attribute for a single-type module
            self.attention_scaling = next(iter(self.attention_scaling.values()))

    def forward(self, x, position_ids, layer_type=None):
        name = "" if layer_type is None else layer_type
        if name not in self.params:
            raise KeyError(f"no RoPE tables for layer type {layer_type!r}; have {sorted(self.params)}")
        p = self.params[name]
        if self.mrope_section is not None and position_ids.ndim == 2:
            position_ids = position_ids.expand(3, -1, -1)  # (3, B, S), as Qwen2-VL
        if _computed_per_call(p):
            cos, sin = _per_call(p, position_ids)  # (..., S, R/2) float64
        else:
            cos_table, sin_table = getattr(self, f"cos_{name}"), getattr(self, f"sin_{name}")
            rows = position_ids
            if name in self.switch:
                # One regime per call, from its largest position, as longrope_frequency_update.
                long = (position_ids.max() + 1 > self.switch[name]).to(position_ids.dtype)
                rows = position_ids + long * self.params[name].max_positions
            cos, sin = cos_table[rows], sin_table[rows]  # (..., S, R/2)
        if self.mrope_section is not None:
            cos, sin = _sections(cos, self.mrope_section), _sections(sin, self.mrope_section)  # (B, S, R/2)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # (B, S, R)
        return cos.to(x.dtype), sin.to(x.dtype)


def _sections(freq, sections):
    """(3, B, S, R/2) -> (B, S, R/2): block i of `sections` from position row i % 3 (transformers 5.23
    `Qwen2VLRotaryEmbedding.recomposition_frequencies`, before its cat)."""
    return torch.cat([m[i % 3] for i, m in enumerate(freq.split(sections, dim=-1))], dim=-1)


def _computed_per_call(p: RopeParams) -> bool:
    return p.runtime_frequencies()


def _per_call(p: RopeParams, position_ids):
    """cos/sin (..., S, R/2) in float64 from frequencies the rule computes for max(position_ids) + 1."""
    freqs, factor = SCALING_RULES.get(p.scaling)(
        theta=p.theta,
        rotary_dim=p.rotary_dim,
        max_positions=p.max_positions,
        dtype=torch.float64,
        seq_len=position_ids.max() + 1,
        **p.scaling_params,
    )
    angles = position_ids.to(torch.float64)[..., None] * freqs  # (..., S, R/2)
    factor = factor * p.attention_factor
    return torch.cos(angles) * factor, torch.sin(angles) * factor


def _is_rotary(module) -> bool:
    """A transformers text rotary module: class name, a config with RoPE parameters, forward(x, position_ids)."""
    if not type(module).__name__.endswith("RotaryEmbedding") or isinstance(module, PatchedRotary):
        return False
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["x", "position_ids"] and hasattr(module, "config")


def _layer_types(module) -> list[str] | None:
    """Gemma 3's per-layer-type module keeps `{layer_type}_inv_freq` buffers and a dict `rope_type`."""
    return sorted(module.rope_type) if isinstance(getattr(module, "rope_type", None), dict) else None


def replacement(name: str, module, seq: int | None) -> PatchedRotary:
    """The PatchedRotary for one transformers rotary module, checked against it; BadInput if not expressible."""
    cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(vars(module.config))
    block = cfg.get("rope_parameters")
    mrope = getattr(module, "mrope_section", None)
    if isinstance(block, dict) and "mrope_section" in block:
        cfg["rope_parameters"] = {k: v for k, v in block.items() if k != "mrope_section"}
    where = f"{name} ({type(module).__name__})"
    try:
        by_type = rope_params_from_dict(cfg, where, seq)
        types = _layer_types(module)
        if types is not None:
            missing = [t for t in types if t not in by_type]
            if missing:
                raise BadInput(f"{where}: rope_parameters has no entry for layer type {missing[0]!r}")
            by_type = {t: by_type[t] for t in types}
        elif "" not in by_type:
            raise BadInput(f"{where}: rope_parameters is keyed by layer type but the module takes none")
        params = {t: RopeParams(**{**d, "pairing": "half"}) for t, d in by_type.items()}
    except ValueError as e:  # RopeParams and the scaling rules name the parameter
        raise BadInput(f"{where}: {e}") from None
    if mrope is not None and sum(mrope) != params[next(iter(params))].rotary_dim // 2:
        raise BadInput(f"{where}: mrope_section {list(mrope)} must sum to rotary_dim/2, got {sum(mrope)}")
    new = PatchedRotary(params, mrope)
    _check(where, module, new)
    return new


def _check(where: str, old, new: PatchedRotary) -> None:
    """Refuse a replacement whose cos/sin differ from the original's on positions 0-15 (a variant this
    module does not know)."""
    ref = next(iter(old.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    x = torch.zeros(1, dtype=torch.float32, device=device)
    ids = torch.arange(CHECK_POSITIONS, device=device)[None]  # (1, S)
    new = new.to(device)
    for layer_type in _layer_types(old) or [None]:
        args = (x, ids) if layer_type is None else (x, ids, layer_type)
        with torch.no_grad():
            want, got = old(*args), new(*args)
        error = max(float((w.double() - g.double()).abs().max()) for w, g in zip(want, got, strict=True))
        if error > CHECK_TOLERANCE:
            kind = "" if layer_type is None else f" layer type {layer_type!r}"
            raise BadInput(
                f"{where}{kind}: pe-export's tables differ from the module's cos/sin by {error:.2e} at positions "
                f"0-{CHECK_POSITIONS - 1} (must be <= {CHECK_TOLERANCE}): an unsupported RoPE variant"
            )


def patch(model, seq: int | None = None) -> dict:
    """Replace every rotary-embedding module of a transformers model by exact-table `PatchedRotary`.

    `seq`: rows per table (positions 0 to seq - 1); default the config's `max_position_embeddings`.
    Returns {module name: the original module}. All replacements are built and checked before any is
    swapped, so a `BadInput` leaves the model untouched. Undo with `unpatch(model)`, or use `patched`.

        >>> replaced = pe_export.patch(model)          # {"model.rotary_emb": LlamaRotaryEmbedding(...)}
        >>> torch.onnx.export(model, ..., dynamo=True)  # exact float64-built tables in the file
        >>> pe_export.unpatch(model)
    """
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise BadInput(f"seq must be an integer >= 1, got {seq!r}")
    if any(isinstance(m, PatchedRotary) for m in model.modules()):
        raise BadInput(f"{type(model).__name__} is already patched; call pe_export.unpatch(model) first")
    # Every path, so that a module shared by several layers is replaced everywhere.
    found = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if _is_rotary(m)]
    if not found:
        raise BadInput(f"{type(model).__name__} has no rotary-embedding module (a *RotaryEmbedding with a config)")
    new = {}
    for name, old in found:
        if id(old) not in new:
            new[id(old)] = replacement(name, old, seq)
            object.__setattr__(new[id(old)], "_pe_export_original", old)  # outside the module tree and the export
    replaced = {}
    for name, old in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new[id(old)])
        replaced[name] = old
    return replaced


def unpatch(model) -> dict:
    """Put back the modules `patch` replaced; returns {module name: the PatchedRotary removed}."""
    restored = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, PatchedRotary):
            parent, _, attr = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, attr, m._pe_export_original)
            restored[name] = m
    return restored


@contextmanager
def patched(model, seq: int | None = None):
    """`with pe_export.patched(model): torch.onnx.export(...)`: patch, then unpatch on the way out."""
    replaced = patch(model, seq)
    try:
        yield replaced
    finally:
        unpatch(model)
