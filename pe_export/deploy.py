"""Deployment options of an export: what the graph fixes or computes, and how it is packaged.

- Static shapes (`Spec.static_shapes`): fixed batch and lengths for runtimes that need them (NPUs);
  the exported graph has no symbolic dim. Per contract:
      rotary     [B, S, H]: x (B, H, S, D) or (B, S, H, D), position_ids (B, S); H is x's heads axis
      absolute   [B, S]: position_ids (B, S)
      bias       [1, S]: Q = K = S; the bias has no batch axis, so B must be 1
      attention  [B, S]: query, key, value (B, heads, S, D), Q = K = S (heads are a parameter already)
  `fit_probes` re-cuts verification probes to exactly those shapes.
- Computed RoPE tables (`RopeParams.tables = "computed"`): cos/sin computed in the graph from the
  positions in float32, as transformers' forward does: `inv_freq` (R/2,) is the one constant, rounded
  once to float32; angle = float(position) * inv_freq in float32; Cos, Sin, the attention factor, a
  cast to the export dtype. The file holds R/2 floats instead of 2 * P * R/2.
- Target choice (`--op auto`), ORT's own `.ort` format, ORT's offline-optimised graph, and external
  data (tables in `FILE.onnx.data`), each recorded in `Spec.deploy`.

**Accuracy of computed tables.** With float64 angles as the truth (`angles="float64"`), the graph's
float32 angle `fl(fl(inv_freq) * p)` is off by at most `2^-23 * p * inv_freq[m]` (two roundings of
relative size 2^-24; positions are exact in float32 below 2^24), and moving a rotation of the pair
(a, b) by dθ moves the output by at most |dθ| * F * (|a| + |b|). Float32 Cos/Sin themselves are off by
at most 1.72 * 2^-24 (measured: ONNX Runtime 1.32 CPU, 4M arguments in [0, 131072]; torch 0.60, NumPy
1.18 in the same units; ONNX does not specify an accuracy for Cos), and the float32 attention factor
adds two more roundings of F: `COS_SIN_ERROR = 2^-22` covers both. So each output element gets
    F * (|a| + |b|) * (2^-23 * p * inv_freq[m] + 2^-22)
on top of the table-rounding bound (`rope_magnitude` adds it). The angle term grows with the position:
measured max abs error of cos/sin vs float64, Llama 3 (theta 5e5, R = 128), ORT CPU, fp32: 1.0e-4 at
position 8191 and 2.1e-3 at 131071 (constant tables: 2.9e-8 at both; the bound's angle term there is
2^-23 * p = 9.8e-4 and 1.6e-2 at the fastest frequency). With `angles="float32"` the graph's angles are
transformers' float32 angles bit for bit (3.0e-4 and 3.7e-3 from float64, as transformers' own
forward), the truth uses them too, and only Cos/Sin's own error remains. Dynamic NTK at run time already computes cos/sin in the graph (in float64) and refuses
`tables="computed"`.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from pe_export.errors import BadInput, one_line

TABLES = ("constant", "computed")
COS_SIN_ERROR = 2.0**-22  # float32 Cos/Sin (<= 1.72 * 2^-24 measured) and the float32 attention factor
ANGLE_ULP = 2.0**-23  # relative error of fl(fl(inv_freq) * p) in float32
FLOAT32_EXACT_POSITIONS = 2**24  # positions above this are not integers in float32

FORMATS = ("onnx", "ort")
OPTIMIZE_LEVELS = ("basic", "extended", "all")
OPTIMIZE_PROVIDERS = ("cpu", "cuda")
DEPLOY_KEYS = ("external_data", "format", "optimize", "optimize_provider")
# External data switches on by itself above 1 GiB of initializers: half of protobuf's hard 2 GiB limit
# on one serialized file, leaving room for the graph and for runtimes (and tools) that copy the whole
# proto once more while loading it. Below it a single self-contained file is easier to move around.
EXTERNAL_DATA_THRESHOLD = 2**30
EXTERNAL_MIN_TENSOR = 1024  # bytes: smaller tensors (shapes, constants) stay inside the .onnx


# ------------------------------------------------------------------------------------------------
# Static shapes


def check_static_shapes(shape) -> None:
    """The form only (positive integers); `check_spec` checks them against the contract and the table."""
    if not isinstance(shape, list) or not shape or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise ValueError(f"static_shapes must be a list of integers like [1, 128], got {shape!r}")
    if any(n < 1 for n in shape):
        raise ValueError(f"--static-shapes sizes must be >= 1, got {','.join(map(str, shape))}")


def parse_static_shapes(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        raise BadInput(f"--static-shapes takes comma-separated integers B,S (B,S,H for RoPE), got {text!r}") from None
    check_static_shapes(shape)
    return shape


def static_sizes(spec) -> dict:
    """{dim name of the contract: size} for a spec with static shapes, after checking them."""
    from pe_export.encodings import encoding_for

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
    from pe_export.encodings import encoding_for

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


# ------------------------------------------------------------------------------------------------
# --op auto


def pick_op(ops: tuple, opset: int | None, for_ort: bool) -> tuple[str, str]:
    """The best target for the opset and runtime: the standard op where the opset has it, ORT's contrib
    op for ONNX Runtime below that, plain ops otherwise. Returns (op, why)."""
    from pe_export.custom_ops.lowerings import OP_TARGETS

    if "onnx" in ops and (opset is None or opset in OP_TARGETS["onnx"].opsets()):
        return "onnx", "the standard RotaryEmbedding op of opset 23+"
    if "ort" in ops and for_ort and opset in OP_TARGETS["ort"].opsets():
        return "ort", f"ONNX Runtime's contrib RotaryEmbedding (opset {opset} has no standard op)"
    why = "any ONNX runtime" if "onnx" in ops else "the only target of this encoding"
    if "onnx" in ops and opset is not None and opset > max(OP_TARGETS["onnx"].opsets()):
        why = f"torch's exporter writes the fused ops up to opset {max(OP_TARGETS['onnx'].opsets())}"
    return "decomposed", f"plain ops ({why})"


# ------------------------------------------------------------------------------------------------
# Computed RoPE tables


def computed_tables_module(spec):
    """RoPE whose cos/sin the graph computes in float32 from the positions (see the module docstring).
    A run-time LongRoPE switch picks its frequency row by max(position_ids) + 1 > switch."""
    import torch

    import pe_export.custom_ops.rotary  # noqa: F401  registers torch.ops.pe_export.rotary_embedding
    from pe_export.encodings.rope import RopeParams, inv_freq, switch_at
    from pe_export.dtypes import torch_dtype

    p = RopeParams(**spec.params)
    P, switch, half = p.max_positions, switch_at(p), p.rotary_dim // 2
    regimes = [inv_freq(p)] + ([inv_freq(p, seq_len=switch + 1)] if switch is not None else [])
    freqs = torch.tensor(np.stack([f for f, _ in regimes]), dtype=torch.float32)  # (1 or 2, R/2), rounded once
    factors = [float(f) for _, f in regimes]

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", freqs)
            if len(set(factors)) > 1:
                self.register_buffer("attention_factor", torch.tensor(factors, dtype=torch.float32))  # (2,)

        def forward(self, x, position_ids):
            B, S = position_ids.shape
            if switch is None:
                inv, factor = self.inv_freq[0], factors[0]
            else:  # one regime for the whole call, as transformers picks it
                long = (position_ids.max() + 1 > switch).to(torch.int64).reshape(1)
                inv = torch.index_select(self.inv_freq, 0, long)[0]
                factor = torch.index_select(self.attention_factor, 0, long) if len(set(factors)) > 1 else factors[0]
            angles = position_ids.to(torch.float32)[..., None] * inv  # (B, S, R/2), float32 as transformers
            cos, sin = torch.cos(angles), torch.sin(angles)
            if not (isinstance(factor, float) and factor == 1.0):
                cos, sin = cos * factor, sin * factor
            cos = cos.to(torch_dtype(spec.dtype)).reshape(B * S, half)  # (B*S, R/2)
            sin = sin.to(torch_dtype(spec.dtype)).reshape(B * S, half)
            rows = torch.arange(B * S, dtype=torch.int64).reshape(B, S)
            # Positions outside [0, P) point past the per-call table, so the call fails as with a table.
            rows = torch.where((position_ids < 0) | (position_ids >= P), B * S, rows)
            return torch.ops.pe_export.rotary_embedding(x, cos, sin, rows, p.pairing == "interleaved", p.rotary_dim, spec.layout)

    return Module().eval()


def computed_tables_slack(spec, p, inputs) -> np.ndarray | float:
    """Per rotated element, the factor by which computed tables widen the rounding magnitude:
    1 + (2^-23 * p * inv_freq[m] + COS_SIN_ERROR) / eps(dtype); 1 for constant tables. Broadcasts to
    x[..., :R]. The angle term is 0 with angles="float32" (the truth uses the same float32 angles)."""
    if getattr(p, "tables", "constant") != "computed":
        return 1.0
    from pe_export.encodings.rope import heads_axis, inv_freq
    from pe_export.dtypes import EPS

    ids = np.asarray(inputs["position_ids"])
    freqs, _ = inv_freq(p, seq_len=int(ids.max()) + 1 if ids.size else None)
    angle_error = 0.0 if p.angles == "float32" else ANGLE_ULP * ids[..., None].astype(np.float64) * np.abs(freqs)  # (B, S, R/2)
    term = np.broadcast_to(1.0 + (angle_error + COS_SIN_ERROR) / EPS[spec.dtype], (*ids.shape, len(freqs)))
    term = np.concatenate([term, term], axis=-1) if p.pairing == "half" else np.repeat(term, 2, axis=-1)  # (B, S, R)
    return np.expand_dims(term, heads_axis(spec.layout))


def check_computed_tables(p) -> None:
    """Refuse what computed tables cannot express (called from RopeParams.__post_init__)."""
    from pe_export.encodings.rope import computed_in_graph

    if p.tables not in TABLES:
        raise ValueError(f"tables must be one of {', '.join(TABLES)}, got {p.tables!r}")
    if p.tables != "computed":
        return
    if computed_in_graph(p):
        raise ValueError(
            f"tables 'computed' does not apply to {p.scaling!r} in mode 'runtime': that graph computes cos/sin "
            f"from the positions already (in float64); drop --tables computed or use mode 'fixed'"
        )
    if p.max_positions > FLOAT32_EXACT_POSITIONS:
        raise ValueError(
            f"tables 'computed' takes max_positions (--seq) <= 2^24 = {FLOAT32_EXACT_POSITIONS} (positions above it "
            f"are not exact in float32), got {p.max_positions}"
        )


# ------------------------------------------------------------------------------------------------
# Packaging: checks, external data, .ort, optimised graph


def check_deploy(spec) -> None:
    """Refuse unknown or inconsistent packaging options (exit 2), before any work."""
    d = spec.deploy
    if not isinstance(d, dict):
        raise BadInput(f"deploy must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(DEPLOY_KEYS))
    if unknown:
        raise BadInput(f"unknown deploy option {unknown[0]!r}; known: {', '.join(DEPLOY_KEYS)}")
    if d.get("format", "onnx") not in FORMATS:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}, got {d['format']!r}")
    if "optimize" in d and d["optimize"] not in OPTIMIZE_LEVELS:
        raise BadInput(f"--optimize must be one of {', '.join(OPTIMIZE_LEVELS)}, got {d['optimize']!r}")
    if d.get("optimize_provider", "cpu") not in OPTIMIZE_PROVIDERS:
        raise BadInput(f"--optimize-provider must be one of {', '.join(OPTIMIZE_PROVIDERS)}, got {d['optimize_provider']!r}")
    if "optimize_provider" in d and "optimize" not in d:
        raise BadInput("--optimize-provider needs --optimize LEVEL")
    if spec.params.get("attention") and spec.params.get("tables") == "computed":
        # The attention layer's bound (encodings.common.attention_magnitude) has no float32-angle term yet.
        raise BadInput("--tables computed does not combine with --attention yet: that layer's error bound has no term "
                       "for float32 angles; use --tables constant")


def check_tools(spec) -> None:
    """The ORT pieces the packaging options need, before anything is written."""
    import importlib.util

    d = spec.deploy
    if not (d.get("format") == "ort" or "optimize" in d):
        return
    try:
        import onnxruntime as ort
    except ImportError:
        raise BadInput("--format ort and --optimize need onnxruntime (pip install 'pe-export[cpu]')") from None
    if d.get("format") == "ort" and importlib.util.find_spec("onnxruntime.tools.convert_onnx_models_to_ort") is None:
        raise BadInput("--format ort needs ONNX Runtime's conversion tool onnxruntime.tools.convert_onnx_models_to_ort, missing here")
    if d.get("optimize_provider") == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BadInput(f"--optimize-provider cuda needs onnxruntime-gpu and a CUDA device; available: {', '.join(ort.get_available_providers())}")


def artifact_paths(spec, output: Path) -> dict:
    """{kind: path} of every file an export writes: the model, its side file, the .ort, the optimised graph."""
    d = spec.deploy
    paths = {"onnx": output}
    if d.get("external_data"):
        paths["data"] = output.with_name(output.name + ".data")
    if d.get("format") == "ort":
        paths["ort"] = output.with_suffix(".ort")
    if "optimize" in d:
        paths["optimized"] = output.with_name(f"{output.stem}.opt-{d['optimize']}-{d.get('optimize_provider', 'cpu')}.onnx")
    return paths


def initializer_bytes(model) -> int:
    return sum(len(t.raw_data) or int(np.prod(t.dims, dtype=np.int64)) * 4 for t in model.graph.initializer)


def finalize_spec(spec, model, external: bool | None):
    """Decide external data (None: above EXTERNAL_DATA_THRESHOLD) and record it in the model's spec."""
    from pe_export.spec import SPEC_KEY

    if external is None:
        external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    deploy = {k: v for k, v in spec.deploy.items() if k != "external_data"} | ({"external_data": True} if external else {})
    spec = replace(spec, deploy=deploy)
    for prop in model.metadata_props:
        if prop.key == SPEC_KEY:
            prop.value = spec.to_json()
    return spec


def to_ort_format(model_bytes: bytes) -> bytes:
    """ONNX Runtime's own conversion (onnxruntime.tools.convert_onnx_models_to_ort, fixed optimisations)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    from pe_export.export import quiet_logging

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(model_bytes)
        try:
            with contextlib.redirect_stdout(io.StringIO()), quiet_logging():
                convert_onnx_models_to_ort(src, output_dir=Path(tmp) / "ort", optimization_styles=[OptimizationStyle.Fixed])
            return (Path(tmp) / "ort" / "model.ort").read_bytes()
        except Exception as e:
            raise BadInput(f"--format ort: ONNX Runtime could not convert the model: {one_line(e, 200)}") from None


def optimize(model_bytes: bytes, level: str, provider: str) -> bytes:
    """ORT's offline-optimised graph for one execution provider (SessionOptions.optimized_model_filepath)."""
    import onnxruntime as ort

    levels = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
    providers = ["CPUExecutionProvider"] if provider == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[level])
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 4
        try:
            ort.InferenceSession(model_bytes, opts, providers=providers)
            return (Path(tmp) / "optimized.onnx").read_bytes()
        except Exception as e:
            raise BadInput(f"--optimize: ONNX Runtime could not optimise the model for {provider}: {one_line(e, 200)}") from None


def write_external(model, path: Path, force: bool) -> list[Path]:
    """The model with its large tensors in `FILE.onnx.data` beside it. Both are written in a temporary
    folder beside `path` and renamed, the side file first; neither overwrites without `force`."""
    import onnx

    from pe_export.export import check_output_path

    side = path.with_name(path.name + ".data")
    check_output_path(path, force)
    check_output_path(side, force)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=side.name, size_threshold=EXTERNAL_MIN_TENSOR)  # fmt: skip
        if not (Path(tmp) / side.name).exists():  # nothing was big enough: still write the (empty) side file
            (Path(tmp) / side.name).write_bytes(b"")
        for f in (Path(tmp) / side.name, staged):
            os.chmod(f, 0o644)
        if not force and (path.exists() or side.exists()):
            raise BadInput(f"{str(path)!r} or {str(side)!r} appeared while exporting; pass --force to overwrite them")
        side_existed = side.exists()
        os.replace(Path(tmp) / side.name, side)
        try:
            os.replace(staged, path)
        except BaseException:
            if not side_existed:
                with contextlib.suppress(FileNotFoundError):
                    side.unlink()
            raise
    return [path, side]


def load_external_data(model, path: Path) -> None:
    """Read the side file(s) of a model saved with external data, in place; one-line errors."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    locations = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            locations |= {e.value for e in t.external_data if e.key == "location"}
    if not locations:
        return
    for loc in sorted(locations):
        if Path(loc).name != loc:
            raise BadInput(f"{str(path)!r} names external data {loc!r} outside its folder; refusing to read it")
        if not (path.parent / loc).is_file():
            raise BadInput(f"{str(path)!r} keeps its tables in {loc!r} beside it, which is missing")
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise BadInput(f"{str(path)!r}: cannot read its external data ({one_line(e, 200)})") from None


def describe(spec) -> str:
    """One line for the CLI: what the deploy options of this spec are."""
    parts = [f"static {','.join(map(str, spec.static_shapes))}"] if spec.static_shapes else []
    if spec.params.get("tables") == "computed":
        parts.append("computed tables")
    parts += [f"{k}={v}" for k, v in sorted(spec.deploy.items())]
    return ", ".join(parts)
