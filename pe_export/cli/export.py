"""The export commands: one per preset (`pe-export PRESET ...`), `from-config`, and `list`.

Each parses its options into the preset's parameters and runs the library's pipeline
(pe_export.pipeline.artifact) step by step, printing each step.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pe_export.cli.common import choices, fail, out, parse_runtimes
from pe_export.cli.verify import exit_on, finish, print_rows
from pe_export.dtypes import DTYPES
from pe_export.encodings.rope import ANGLES, PAIRINGS, TABLES
from pe_export.pipeline.packaging import FORMATS, OPTIMIZE_LEVELS, OPTIMIZE_PROVIDERS
from pe_export.presets import LAYERED_PRESETS, PRESETS, LayeredPreset, Preset
from pe_export.scaling import dynamic, longrope
from pe_export.spec import LAYOUTS, OP_NAMES
from pe_export.weights import WEIGHT_FIELDS

app = typer.Typer()

Op = choices("Op", OP_NAMES)
DType = choices("DType", DTYPES)
Layout = choices("Layout", LAYOUTS)
Pairing = choices("Pairing", PAIRINGS)
Angles = choices("Angles", ANGLES)
LongropeMode = choices("LongropeMode", longrope.MODES)
DynamicMode = choices("DynamicMode", dynamic.MODES)


@app.command("list")
def list_presets():
    """List the presets, what each one is, and the parameters it sets."""
    table = Table("preset", "encoding", "scaling", "description", "parameters")
    for p in PRESETS.values():
        params = {k: v for k, v in p.params.items() if k not in ("scaling", "scaling_params")}
        scaling = p.params.get("scaling", "")
        if p.params.get("scaling_params"):
            scaling += " (" + ", ".join(f"{k}={v}" for k, v in p.params["scaling_params"].items()) + ")"
        table.add_row(p.name, p.encoding, scaling, p.description, ", ".join(f"{k}={v}" for k, v in params.items()))
    for p in LAYERED_PRESETS.values():  # one file per layer type
        per_type = "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in params.items()) for name, params in p.rope.items()
        )
        table.add_row(p.name, "rope (per layer)", "", p.description, per_type)
    out.print(table)


# Options every export command takes, whatever the encoding.
CommonOptions = dict(
    seq=(
        Annotated[int | None, typer.Option("--seq", help="The largest position + 1 the graph accepts (table length).")],
        None,
    ),
    output=(
        Annotated[
            Path | None,
            typer.Option("--output", "-o", help="Output file (default: PRESET.onnx in the current folder)."),
        ],
        None,
    ),
    op=(
        Annotated[
            choices("OpChoice", (*OP_NAMES, "auto")) | None,
            typer.Option(
                help="ONNX target: standard op, ORT contrib op, or plain ops (RoPE; the others are plain ops); auto: "
                "the best the opset and runtime take."
            ),
        ],
        None,
    ),
    dtype=(Annotated[DType, typer.Option(help="dtype of the float inputs, outputs and tables.")], DType("fp32")),
    opset=(Annotated[int | None, typer.Option(help="ONNX opset (default: the lowest the target takes).")], None),
    attention=(
        Annotated[
            bool,
            typer.Option(
                "--attention",
                help="Export one attention layer (query, key, value -> output) with the encoding applied as its "
                "paper does.",
            ),
        ],
        False,
    ),
    attention_head_dim=(
        Annotated[
            int | None,
            typer.Option(help="--attention with a bias encoding: head dim of query and key (default 64)."),
        ],
        None,
    ),
    attention_causal=(
        Annotated[
            bool | None,
            typer.Option(
                "--attention-causal/--attention-bidirectional",
                help="--attention with an absolute or rotary encoding: mask keys after their query.",
            ),
        ],
        None,
    ),
    force=(Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")], False),
    report=(
        Annotated[Path | None, typer.Option(help="Also write the parity report: FILE.json, or FILE.md for Markdown.")],
        None,
    ),
    seed=(Annotated[int, typer.Option(min=0, help="Seed of the random verification inputs.")], 0),
    runtimes=(
        Annotated[
            str | None,
            typer.Option(
                help="Runtimes that verify the export, comma separated (default: every one; see pe-export verify)."
            ),
        ],
        None,
    ),
    static_shapes=(
        Annotated[
            str | None,
            typer.Option(
                help="Fixed input sizes, no symbolic dims (NPUs): B,S (B,S,H for RoPE: H heads; 1,S for a bias)."
            ),
        ],
        None,
    ),
    format=(
        Annotated[
            choices("Format", FORMATS) | None,
            typer.Option(
                help="ort: also write ONNX Runtime's .ort file beside the .onnx (ORT's own converter), verified."
            ),
        ],
        None,
    ),
    optimize=(
        Annotated[
            choices("OptimizeLevel", OPTIMIZE_LEVELS) | None,
            typer.Option(
                help="Also write ORT's offline-optimised graph at this level (FILE.opt-LEVEL-PROVIDER.onnx), verified."
            ),
        ],
        None,
    ),
    optimize_provider=(
        Annotated[
            choices("OptimizeProvider", OPTIMIZE_PROVIDERS) | None,
            typer.Option(help="Execution provider --optimize optimises for (default cpu)."),
        ],
        None,
    ),
    external_data=(
        Annotated[
            bool | None,
            typer.Option(
                "--external-data/--no-external-data",
                help="Tables in FILE.onnx.data beside the model (default: on above 1 GiB of tables).",
            ),
        ],
        None,
    ),
)


def with_signature(fn, options: dict):
    """Give `fn(**kwargs)` the signature Typer reads: {name: (annotation, default)}."""
    kind = inspect.Parameter.KEYWORD_ONLY
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, annotation=a, default=d) for n, (a, d) in options.items()]
    )
    return fn


def layer_params(options) -> dict:
    """The --attention parameters, recorded only when asked for."""
    if not options["attention"]:
        if options["attention_head_dim"] is not None or options["attention_causal"] is not None:
            fail("--attention-head-dim and --attention-causal/--attention-bidirectional need --attention")
        return {}
    layer = {
        "attention": True,
        "attention_head_dim": options["attention_head_dim"],
        "attention_causal": options["attention_causal"],
    }
    return {k: v for k, v in layer.items() if v is not None}


ROPE_COMMAND = ("rope", "mrope")  # encodings whose parameters are a RopeParams' (RoPE's options, --config)


def make_export_command(preset: Preset):
    return (make_rope_command if preset.encoding in ROPE_COMMAND else make_generic_command)(preset)


def make_rope_command(preset: Preset):
    def export_command(
        layout: Annotated[
            Layout, typer.Option(help="x as (batch, heads, seq, dim) or (batch, seq, heads, dim).")
        ] = Layout("bhsd"),
        angles: Annotated[
            Angles, typer.Option(help="float64: exact tables; float32: transformers' float32 angles, bit for bit.")
        ] = Angles("float64"),
        tables: Annotated[
            choices("Tables", TABLES) | None,
            typer.Option(
                help="constant: cos/sin tables in the file (default); computed: cos/sin computed in the graph in "
                "float32 from the positions (a tiny file, less accurate at large positions)."
            ),
        ] = None,
        theta: Annotated[float | None, typer.Option(help="RoPE base.")] = None,
        head_dim: Annotated[int | None, typer.Option(help="Head dimension D.")] = None,
        rotary_dim: Annotated[
            int | None, typer.Option(help="Rotated dims R, for partial rotary (default: the whole head).")
        ] = None,
        pairing: Annotated[
            Pairing | None,
            typer.Option(help="half: pairs (i, i+R/2) as Llama-HF; interleaved: (2i, 2i+1) as GPT-J."),
        ] = None,
        scaling: Annotated[
            str | None, typer.Option(help="RoPE scaling rule, replacing the preset's (and its parameters).")
        ] = None,
        scaling_param: Annotated[
            list[str] | None,
            typer.Option(
                "--scaling-param",
                help="KEY=VALUE for the scaling rule, repeatable; VALUE is JSON (4.0, [1.0, 1.1], true).",
            ),
        ] = None,
        longrope_mode: Annotated[
            LongropeMode | None,
            typer.Option(
                help="longrope only. runtime: switch to the long factors past the original length, as "
                "transformers (default); long: long factors everywhere, as vLLM (keeps a KV cache consistent)."
            ),
        ] = None,
        dynamic_mode: Annotated[
            DynamicMode | None,
            typer.Option(
                help="dynamic only. runtime: the graph computes the base from its positions, as "
                "transformers (default); fixed: one table for --seq, as vLLM."
            ),
        ] = None,
        hf_config: Annotated[
            Path | None,
            typer.Option(
                "--config",
                help="Take the RoPE parameters from a local Hugging Face config.json instead of the preset's (as "
                "from-config does).",
            ),
        ] = None,
        **common,
    ):
        base = preset.params
        if hf_config is not None:
            from pe_export.hf_config import rope_params_from_config

            try:
                base = rope_params_from_config(hf_config, max_positions=common["seq"])
            except ValueError as e:
                fail(str(e))
            out.print(f"{hf_config}: " + ", ".join(f"{k}={v}" for k, v in base.items()), soft_wrap=True)
        from pe_export.encodings.rope import with_overrides

        try:
            params = with_overrides(
                base,
                max_positions=common["seq"],
                theta=theta,
                head_dim=head_dim,
                rotary_dim=rotary_dim,
                pairing=pairing.value if pairing else None,
                angles=angles.value,
                tables=tables.value if tables else "constant",
                scaling=scaling,
                scaling_updates=parse_scaling_params(scaling_param) if scaling_param else None,
                longrope_mode=longrope_mode.value if longrope_mode else None,
                dynamic_mode=dynamic_mode.value if dynamic_mode else None,
            )
        except ValueError as e:
            fail(str(e))
        run_export(preset, {**params, **layer_params(common)}, layout.value, common)

    own = inspect.signature(export_command, eval_str=True).parameters
    options = {n: (q.annotation, q.default) for n, q in own.items() if n != "common"}
    with_signature(export_command, {**options, **CommonOptions})
    export_command.__doc__ = f"{preset.description}. Exports, checks and verifies an ONNX file."
    return export_command


def make_generic_command(preset: Preset):
    """An export command whose options are the encoding's parameter fields (`--num-buckets`, `--causal/
    --no-causal`, ...), each defaulting to the preset's value; learned encodings add --weights/--key."""
    import dataclasses
    import typing

    from pe_export.encodings import ENCODINGS

    cls = ENCODINGS.get(preset.encoding).params
    hints = typing.get_type_hints(cls)
    options = {}
    for f in dataclasses.fields(cls):
        if f.name == "max_positions" or f.name in WEIGHT_FIELDS:
            continue
        kind = typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name]) else hints[f.name]  # X | None -> X
        if kind is dict:  # a nested block (a wrapped RoPE's scaling_params): the preset's, not an option
            continue
        flag = f"--{f.name.replace('_', '-')}"
        decl = [f"{flag}/--no-{f.name.replace('_', '-')}"] if kind is bool else [flag]
        shown = preset.params.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        options[f.name] = (
            Annotated[kind | None, typer.Option(*decl, help=f"{preset.encoding} {f.name} (preset: {shown}).")],
            None,
        )
    learned = "weights_seed" in {f.name for f in dataclasses.fields(cls)}
    if learned:
        options |= dict(
            weights=(
                Annotated[
                    Path | None, typer.Option(help="Learned weights: a .safetensors file or a torch state dict.")
                ],
                None,
            ),
            key=(Annotated[str | None, typer.Option(help="Name of the tensor in --weights.")], None),
            weights_seed=(
                Annotated[int | None, typer.Option(min=0, help="Seed of the random weights used without --weights.")],
                None,
            ),
        )

    def export_command(**kw):
        params = {**preset.params, **{k: v for k, v in kw.items() if k in options and v is not None}}
        if kw["seq"] is not None:
            params["max_positions"] = kw["seq"]
        if learned and (kw["weights"] is not None or kw["key"] is not None):
            params |= load_weights_params(kw)
        run_export(preset, {**params, **layer_params(kw)}, "bhsd", kw)

    with_signature(export_command, {**options, **CommonOptions})
    export_command.__doc__ = f"{preset.description}. Exports, checks and verifies an ONNX file."
    return export_command


def load_weights_params(kw) -> dict:
    """--weights FILE --key NAME, checked together, as the parameters that name the learned table."""
    from pe_export.pipeline.artifact import weights_source

    if kw["weights"] is None or kw["key"] is None:
        fail("--weights FILE and --key NAME go together")
    if kw["weights_seed"] is not None:
        fail("--weights-seed applies to random weights; drop it with --weights")
    try:
        return weights_source(kw["weights"], kw["key"])
    except ValueError as e:
        fail(str(e))


def parse_scaling_params(items: list[str]) -> dict:
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--scaling-param takes KEY=VALUE, got {item!r}")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fail(f"--scaling-param {key.strip()}: VALUE must be JSON (a number, a list, true or false), got {value!r}")
    return parsed


for _preset in PRESETS.values():
    if _preset.encoding in ROPE_COMMAND:  # the others' options come from their encoding's module: built on use
        app.command(_preset.name)(make_export_command(_preset))

LAZY_PRESETS = tuple(p for p in PRESETS.values() if p.encoding not in ROPE_COMMAND)


def preset_command(preset: Preset):
    """The click command of a preset, built now (its options need its encoding's module, and so torch)."""
    single = typer.Typer()
    single.command(preset.name)(make_export_command(preset))
    return typer.main.get_command(single)


def from_config_command(config: Path, **options):
    """Read RoPE parameters from a local Hugging Face config.json, print them, then export and verify (one file
    per distinct parameter set where layer types differ, `<folder>-rope-<layer_type>.onnx`)."""
    from pe_export.hf_config import rope_layers_from_config

    try:
        found = rope_layers_from_config(config, max_positions=options.get("seq"))
    except ValueError as e:
        fail(str(e))
    export_layers(f"{config.resolve().parent.name or 'config'}-rope", str(config), found, options)


def make_layered_command(preset: LayeredPreset):
    def export_command(**options):
        from pe_export.hf_config import RopeLayers

        seq = {"max_positions": options["seq"]} if options["seq"] is not None else {}
        rope = {name: {**params, **seq} for name, params in preset.rope.items()}  # printed as exported
        export_layers(preset.name, preset.name, RopeLayers.from_pattern(rope, preset.pattern), options)

    own = {n: (p.annotation, p.default) for n, p in _options_of_rope_commands().items() if n != "hf_config"}
    with_signature(export_command, own)
    export_command.__doc__ = f"{preset.description}. Exports, checks and verifies one ONNX file per layer type."
    return export_command


def export_layers(stem: str, source: str, found, options) -> None:
    """Export every distinct parameter set of `found` (a `RopeLayers`): one set keeps the single-file command
    (`stem.onnx`), several write `stem-<layer_type>.onnx` each (`-o X.onnx`: `X-<layer_type>.onnx`). Every set
    and every output path is checked before the first file is written."""
    from pe_export.encodings import ENCODINGS
    from pe_export.files import check_output_path

    groups = found.distinct()
    for name, params in found.rope.items():
        try:
            ENCODINGS.get(encoding_of(params)).params(**params)  # validate before printing anything
        except ValueError as e:
            fail(f"{name}: {e}" if name else str(e))
    if len(groups) == 1 and not found.nope:
        (first,) = groups
        params = found.rope[first]
        encoding = encoding_of(params)
        stem = stem.removesuffix("-rope") + "-mrope" if encoding == "mrope" else stem
        out.print(f"{source}: " + ", ".join(f"{k}={v}" for k, v in params.items()), soft_wrap=True)
        preset = Preset(name=stem, encoding=encoding, description=f"from {source}", params=params)
        make_export_command(preset)(**options)
        return
    jobs = []
    outputs = found.paths(options["output"] or Path(f"{stem}.onnx"))
    reports = found.paths(options["report"]) if options["report"] else {}
    for first, types in groups.items():
        output, report = outputs[first], reports.get(first)
        for path in (output, report):
            try:
                if path is not None:
                    check_output_path(path, options["force"])
            except ValueError as e:
                fail(str(e))
        layers = sorted(i for t in types for i in found.layers.get(t, ()))
        jobs.append((first, types, layers, output.stem, {**options, "output": output, "report": report}))
    for first, types, layers, _, job in jobs:
        params = found.rope[first]
        out.print(
            f"{', '.join(types) or 'every layer'} (layers {spans(layers) if layers else 'not in the config'}) -> "
            f"{job['output']}: " + ", ".join(f"{k}={v}" for k, v in params.items()),
            soft_wrap=True,
        )
    out.print(f"no RoPE (NoPE) in layers {spans(found.nope)}" if found.nope else "every layer uses RoPE")
    for first, types, _, name, job in jobs:
        preset = Preset(
            name=name, encoding="rope", description=f"{', '.join(types)} from {source}", params=found.rope[first]
        )
        make_export_command(preset)(**job)


def encoding_of(params: dict) -> str:
    """M-RoPE (pe_export.encodings.mrope) when the parameters carry Qwen2-VL's mrope_section, else RoPE."""
    return "mrope" if "mrope_section" in params else "rope"


def spans(indices) -> str:
    """0, 1, 2, 4, 5 -> '0-2, 4-5' (layer indices, 0-based)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs) or "none"


# from-config takes the config path, then exactly the preset commands' options.
_options = inspect.signature(make_export_command(next(iter(PRESETS.values()))), eval_str=True).parameters.values()
_config = inspect.Parameter(
    "config",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Annotated[Path, typer.Argument(help="A local Hugging Face config.json.")],
)
from_config_command.__signature__ = inspect.Signature([_config, *(o for o in _options if o.name != "hf_config")])
app.command("from-config")(from_config_command)


def _options_of_rope_commands() -> dict:
    return {o.name: o for o in _options}


for _layered in LAYERED_PRESETS.values():
    app.command(_layered.name)(make_layered_command(_layered))


def run_export(preset, params, layout, options):
    """Parse the common options, then run the library's pipeline step by step, printing each."""
    import dataclasses

    from pe_export.encodings.static_shapes import parse_static_shapes
    from pe_export.pipeline import artifact as pipeline

    output = options["output"] or Path(f"{preset.name}.onnx")
    runtimes = parse_runtimes(options["runtimes"]) if options["runtimes"] is not None else None
    value = lambda o: o.value if o is not None else None  # noqa: E731
    try:
        static = parse_static_shapes(options["static_shapes"]) if options["static_shapes"] is not None else None
        job = pipeline.prepare(
            dataclasses.replace(preset, params=params),
            output,
            force=options["force"],
            report=options["report"],
            op=value(options["op"]),
            dtype=options["dtype"].value,
            layout=layout,
            opset=options["opset"],
            static_shapes=static,
            format=value(options["format"]),
            optimize=value(options["optimize"]),
            optimize_provider=value(options["optimize_provider"]),
            external_data=options["external_data"],
        )
    except ValueError as e:  # parameter validation and BadInput alike
        fail(str(e))
    for note in job.notes:
        out.print(note if note.startswith("--op auto") else f"[yellow]note[/yellow]: {note}", soft_wrap=True)
    spec = job.spec
    pipeline.start_runtimes(runtimes)  # their workers import their runtimes while the export runs
    with out.status(f"exporting {preset.name} ({spec.op}, {spec.dtype})"):
        try:
            written = pipeline.write(job)
        except ValueError as e:
            fail(str(e))
    describe = pipeline.packaging.describe(written.spec)
    more = f", {describe}" if describe else ""
    out.print(
        f"wrote {output} ({written.size / 2**20:.2f} MiB, op {spec.op}, opset {spec.opset}, {spec.dtype}, "
        f"{layout}{more})"
    )
    finish(output, runtimes, options["report"], options["force"], options["seed"])
    for kind in ("ort", "optimized"):
        if kind in written.paths:
            path = written.paths[kind]
            out.print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
            with out.status(f"verifying {path}"):
                result = pipeline.verify_artifact(
                    path, written.spec, pipeline.artifact_runtimes(written.spec, kind), options["seed"]
                )
            print_rows(result.rows)
            exit_on(result, f"parity check failed for {path}; it is kept for inspection")
            out.print(f"[green]verified[/green]: {path} matches the float64 reference on every runtime that ran")
