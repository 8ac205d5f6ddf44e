"""The `pe-export` command line (installed as `pe_export.cli`).

    pe-export PRESET --seq N [-o FILE] [--op ...] [--dtype ...] [--layout ...] [--force]
    pe-export list
    pe-export verify FILE [--runtimes ...] [--positions ...] [--batch N] [--probe-bounds] [--report FILE.json|.md]
    pe-export matrix [--presets ...] [--ops ...] [--dtypes ...] [--runtimes ...] [--quick] [--shard i/n]

Exit codes: 0 success, 1 parity failure (or nothing here could verify), 2 bad input. Bad input
prints one line on stderr, never a traceback, and writes nothing.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from rich.table import Table

from pe_export.cli import bench as _bench
from pe_export.cli import matrix as _matrix
from pe_export.cli import tools
from pe_export.cli.common import choices, fail, free_folder, out, parse_runtimes

from pe_export.encodings.rope import ANGLES, PAIRINGS

TABLES = ("constant", "computed")  # pe_export.deploy.TABLES, import-free
from pe_export.presets import PRESETS, Preset
from pe_export.scaling import dynamic, longrope
from pe_export.dtypes import DTYPES
from pe_export.spec import LAYOUTS, OP_NAMES

FORMATS, OPTIMIZE_LEVELS, OPTIMIZE_PROVIDERS = ("onnx", "ort"), ("basic", "extended", "all"), ("cpu", "cuda")  # pe_export.deploy's, import-free

COMMANDS = ("list", "verify", "matrix", "from-config", "inspect", "plot", "bench")
class Group(typer.core.TyperGroup):
    """Turns every usage error into one line with exit code 2, and lists the presets for a wrong name."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            fail(f"unknown preset or command {name!r}; presets: {', '.join(PRESETS)}; commands: {', '.join(COMMANDS)}")
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # typer's (vendored click's) usage errors
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # prints the help
                rv = 0
            else:
                message = e.format_message() if hasattr(e, "format_message") else str(e)
                typer.echo(f"pe-export: error: {' '.join(message.split())}", err=True)
                rv = getattr(e, "exit_code", 2)
        except typer.Abort:
            typer.echo("pe-export: aborted", err=True)
            rv = 1
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Export Transformer positional encodings to ONNX graphs verified against PyTorch.",
)


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
    out.print(table)


# Options every export command takes, whatever the encoding.
CommonOptions = dict(
    seq=(Annotated[Optional[int], typer.Option("--seq", help="The largest position + 1 the graph accepts (table length).")], None),
    output=(Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default: PRESET.onnx in the current folder).")], None),
    op=(Annotated[Optional[choices("OpChoice", (*OP_NAMES, "auto"))], typer.Option(help="ONNX target: standard op, ORT contrib op, or plain ops (RoPE; the others are plain ops); auto: the best the opset and runtime take.")], None),
    dtype=(Annotated[DType, typer.Option(help="dtype of the float inputs, outputs and tables.")], DType("fp32")),
    opset=(Annotated[Optional[int], typer.Option(help="ONNX opset (default: the lowest the target takes).")], None),
    attention=(Annotated[bool, typer.Option("--attention", help="Export one attention layer (query, key, value -> output) with the encoding applied as its paper does.")], False),
    attention_head_dim=(Annotated[Optional[int], typer.Option(help="--attention with a bias encoding: head dim of query and key (default 64).")], None),
    attention_causal=(Annotated[Optional[bool], typer.Option("--attention-causal/--attention-bidirectional", help="--attention with an absolute or rotary encoding: mask keys after their query.")], None),
    force=(Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")], False),
    report=(Annotated[Optional[Path], typer.Option(help="Also write the parity report: FILE.json, or FILE.md for Markdown.")], None),
    seed=(Annotated[int, typer.Option(min=0, help="Seed of the random verification inputs.")], 0),
    runtimes=(Annotated[Optional[str], typer.Option(help="Runtimes that verify the export, comma separated (default: every one; see pe-export verify).")], None),
    static_shapes=(Annotated[Optional[str], typer.Option(help="Fixed input sizes, no symbolic dims (NPUs): B,S (B,S,H for RoPE: H heads; 1,S for a bias).")], None),
    format=(Annotated[Optional[choices("Format", FORMATS)], typer.Option(help="ort: also write ONNX Runtime's .ort file beside the .onnx (ORT's own converter), verified.")], None),
    optimize=(Annotated[Optional[choices("OptimizeLevel", OPTIMIZE_LEVELS)], typer.Option(help="Also write ORT's offline-optimised graph at this level (FILE.opt-LEVEL-PROVIDER.onnx), verified.")], None),
    optimize_provider=(Annotated[Optional[choices("OptimizeProvider", OPTIMIZE_PROVIDERS)], typer.Option(help="Execution provider --optimize optimises for (default cpu).")], None),
    external_data=(Annotated[Optional[bool], typer.Option("--external-data/--no-external-data", help="Tables in FILE.onnx.data beside the model (default: on above 1 GiB of tables).")], None),
)  # fmt: skip


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
    layer = {"attention": True, "attention_head_dim": options["attention_head_dim"], "attention_causal": options["attention_causal"]}
    return {k: v for k, v in layer.items() if v is not None}


def make_export_command(preset: Preset):
    return (make_rope_command if preset.encoding == "rope" else make_generic_command)(preset)


def make_rope_command(preset: Preset):
    def export_command(
        layout: Annotated[Layout, typer.Option(help="x as (batch, heads, seq, dim) or (batch, seq, heads, dim).")] = Layout("bhsd"),
        angles: Annotated[
            Angles, typer.Option(help="float64: exact tables; float32: transformers' float32 angles, bit for bit.")
        ] = Angles("float64"),
        tables: Annotated[
            Optional[choices("Tables", TABLES)],
            typer.Option(help="constant: cos/sin tables in the file (default); computed: cos/sin computed in the graph in float32 from the positions (a tiny file, less accurate at large positions)."),
        ] = None,  # fmt: skip
        theta: Annotated[Optional[float], typer.Option(help="RoPE base.")] = None,
        head_dim: Annotated[Optional[int], typer.Option(help="Head dimension D.")] = None,
        rotary_dim: Annotated[Optional[int], typer.Option(help="Rotated dims R, for partial rotary (default: the whole head).")] = None,
        pairing: Annotated[
            Optional[Pairing], typer.Option(help="half: pairs (i, i+R/2) as Llama-HF; interleaved: (2i, 2i+1) as GPT-J.")
        ] = None,
        scaling: Annotated[
            Optional[str], typer.Option(help="RoPE scaling rule, replacing the preset's (and its parameters).")
        ] = None,
        scaling_param: Annotated[
            Optional[list[str]],
            typer.Option("--scaling-param", help="KEY=VALUE for the scaling rule, repeatable; VALUE is JSON (4.0, [1.0, 1.1], true)."),
        ] = None,  # fmt: skip
        longrope_mode: Annotated[
            Optional[LongropeMode],
            typer.Option(help="longrope only. runtime: switch to the long factors past the original length, as "
                         "transformers (default); long: long factors everywhere, as vLLM (keeps a KV cache consistent)."),
        ] = None,  # fmt: skip
        dynamic_mode: Annotated[
            Optional[DynamicMode],
            typer.Option(help="dynamic only. runtime: the graph computes the base from its positions, as "
                         "transformers (default); fixed: one table for --seq, as vLLM."),
        ] = None,  # fmt: skip
        hf_config: Annotated[
            Optional[Path], typer.Option("--config", help="Take the RoPE parameters from a local Hugging Face config.json instead of the preset's (as from-config does).")
        ] = None,  # fmt: skip
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
        overrides = dict(
            max_positions=common["seq"], theta=theta, head_dim=head_dim, rotary_dim=rotary_dim,
            pairing=pairing.value if pairing else None, angles=angles.value, tables=tables.value if tables else "constant",
        )  # fmt: skip
        params = {**base, **{k: v for k, v in overrides.items() if v is not None}}
        if scaling is not None and scaling != params.get("scaling"):
            params["scaling"], params["scaling_params"] = scaling, {}
        if scaling_param:
            params["scaling_params"] = {**params.get("scaling_params", {}), **parse_scaling_params(scaling_param)}
        for rule, chosen in (("longrope", longrope_mode), ("dynamic", dynamic_mode)):
            if params.get("scaling") == rule:  # always recorded, so the file says which semantics it has
                mode = chosen.value if chosen else params["scaling_params"].get("mode", "runtime")
                params["scaling_params"] = {**params["scaling_params"], "mode": mode}
            elif chosen is not None:
                fail(f"--{rule}-mode applies to the {rule} scaling rule; this export uses {params.get('scaling', 'default')!r}")
        if head_dim is not None and rotary_dim is None and "rotary_dim" in base:
            # Keep the preset's rotary fraction, as transformers' partial_rotary_factor does.
            params["rotary_dim"] = int(head_dim * base["rotary_dim"] / base["head_dim"])
        run_export(preset, {**params, **layer_params(common)}, layout.value, common)

    own = inspect.signature(export_command, eval_str=True).parameters
    options = {n: (q.annotation, q.default) for n, q in own.items() if n != "common"}
    with_signature(export_command, {**options, **CommonOptions})
    export_command.__doc__ = f"{preset.description}. Exports, checks and verifies an ONNX file."
    return export_command


WEIGHT_FIELDS = ("weights_seed", "weights", "key", "weights_sha256")


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
        options[f.name] = (Annotated[Optional[kind], typer.Option(*decl, help=f"{preset.encoding} {f.name} (preset: {shown}).")], None)
    learned = "weights_seed" in {f.name for f in dataclasses.fields(cls)}
    if learned:
        options |= dict(
            weights=(Annotated[Optional[Path], typer.Option(help="Learned weights: a .safetensors file or a torch state dict.")], None),
            key=(Annotated[Optional[str], typer.Option(help="Name of the tensor in --weights.")], None),
            weights_seed=(Annotated[Optional[int], typer.Option(min=0, help="Seed of the random weights used without --weights.")], None),
        )

    def export_command(**kw):
        params = {**preset.params, **{k: v for k, v in kw.items() if k in options and v is not None}}
        if kw["seq"] is not None:
            params["max_positions"] = kw["seq"]
        if learned and (kw["weights"] is not None or kw["key"] is not None):
            params |= load_weights_params(cls, kw, params)
        run_export(preset, {**params, **layer_params(kw)}, "bhsd", kw)

    with_signature(export_command, {**options, **CommonOptions})
    export_command.__doc__ = f"{preset.description}. Exports, checks and verifies an ONNX file."
    return export_command


def load_weights_params(cls, kw, params) -> dict:
    """Read --weights/--key once: record the file, key and sha256; take the table's shape where the
    encoding's parameters follow it (a learned table's rows and dim) and were not given."""
    from pe_export import weights

    if kw["weights"] is None or kw["key"] is None:
        fail("--weights FILE and --key NAME go together")
    if kw["weights_seed"] is not None:
        fail("--weights-seed applies to random weights; drop it with --weights")
    src = weights.LearnedWeights(weights=str(kw["weights"].resolve()), key=kw["key"])
    try:
        tensor = weights.load(src)
    except ValueError as e:
        fail(str(e))
    found = {"weights": src.weights, "key": src.key, "weights_sha256": weights.digest(tensor)}
    shape_params = getattr(cls, "shape_params", None)
    if shape_params:
        found |= {k: v for k, v in shape_params(tensor.shape).items() if kw.get(k) is None}
        if kw["seq"] is None and "max_positions" in params:
            found["max_positions"] = None  # all the file's rows
    return found


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
    app.command(_preset.name)(make_export_command(_preset))


def from_config_command(config: Path, **options):
    """Read RoPE parameters from a local Hugging Face config.json, print them, then export and verify."""
    from pe_export.encodings.rope import RopeParams
    from pe_export.hf_config import rope_params_from_config

    try:
        params = rope_params_from_config(config, max_positions=options.get("seq"))
        RopeParams(**params)  # validate before printing anything
    except ValueError as e:
        fail(str(e))
    name = f"{config.resolve().parent.name or 'config'}-rope"
    out.print(f"{config}: " + ", ".join(f"{k}={v}" for k, v in params.items()), soft_wrap=True)
    preset = Preset(name=name, encoding="rope", description=f"from {config}", params=params)
    make_export_command(preset)(**options)


# from-config takes the config path, then exactly the preset commands' options.
_options = inspect.signature(make_export_command(next(iter(PRESETS.values()))), eval_str=True).parameters.values()
_config = inspect.Parameter(
    "config", inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Annotated[Path, typer.Argument(help="A local Hugging Face config.json.")],
)  # fmt: skip
from_config_command.__signature__ = inspect.Signature([_config, *(o for o in _options if o.name != "hf_config")])
app.command("from-config")(from_config_command)


def run_export(preset, params, layout, options):
    from pe_export import deploy
    from pe_export.export import build, check_output_path, check_spec, load, write_atomic
    from pe_export.spec import Spec

    output, force = options["output"] or Path(f"{preset.name}.onnx"), options["force"]
    from pe_export.verify import DEFAULT_RUNTIMES

    runtimes = parse_runtimes(options["runtimes"]) if options["runtimes"] is not None else DEFAULT_RUNTIMES
    picked = None
    try:
        from pe_export.custom_ops.lowerings import OP_TARGETS
        from pe_export.encodings import ENCODINGS

        settings = {"format": options["format"] and options["format"].value, "optimize": options["optimize"] and options["optimize"].value,
                    "optimize_provider": options["optimize_provider"] and options["optimize_provider"].value}  # fmt: skip
        settings = {k: v for k, v in settings.items() if v is not None and v != "onnx"}
        if options["external_data"]:
            settings["external_data"] = True
        static = deploy.parse_static_shapes(options["static_shapes"]) if options["static_shapes"] is not None else None
        op = options["op"].value if options["op"] else ENCODINGS.get(preset.encoding).ops[0]
        if op == "auto":
            for_ort = settings.get("format") == "ort" or "optimize" in settings
            op, picked = deploy.pick_op(ENCODINGS.get(preset.encoding).ops, options["opset"], for_ort)
        opset = options["opset"] if options["opset"] is not None else OP_TARGETS[op].min_opset
        spec = Spec(encoding=preset.encoding, params=params, op=op, opset=opset, dtype=options["dtype"].value, layout=layout,
                    static_shapes=static, deploy=settings)  # fmt: skip
        check_spec(spec)
        deploy.check_tools(spec)
        for path in deploy.artifact_paths(spec, output).values():
            check_output_path(path, force)
        check_report_path(options["report"], output, force)
    except ValueError as e:  # parameter validation and BadInput alike
        fail(str(e))
    if picked:
        out.print(f"--op auto picked {op} (opset {opset}): {picked}")
    if spec.encoding == "rope":
        from pe_export.encodings.rope import RopeParams, switch_note

        if note := switch_note(RopeParams(**spec.params)):
            out.print(f"[yellow]note[/yellow]: {note}", soft_wrap=True)
    extra = {}  # kind -> bytes of the files written beside the model
    with out.status(f"exporting {preset.name} ({op}, {spec.dtype})"):
        try:
            model = build(spec)
            spec = deploy.finalize_spec(spec, model, options["external_data"])  # records external data
            data = model.SerializeToString()
            if spec.deploy.get("format") == "ort":
                extra["ort"] = deploy.to_ort_format(data)
            if "optimize" in spec.deploy:
                extra["optimized"] = deploy.optimize(data, spec.deploy["optimize"], spec.deploy.get("optimize_provider", "cpu"))
        except ValueError as e:  # weights that changed or went missing since they were checked; ORT refusing
            fail(str(e))
    paths = deploy.artifact_paths(spec, output)
    try:
        for path in paths.values():
            check_output_path(path, force)
        if spec.deploy.get("external_data"):
            deploy.write_external(model, output, force)
        else:
            write_atomic(data, output, force)
        for kind, blob in extra.items():
            write_atomic(blob, paths[kind], force)
        data = load(output)[0].SerializeToString() if spec.deploy.get("external_data") else output.read_bytes()
    except ValueError as e:
        fail(str(e))
    size = sum(paths[k].stat().st_size for k in ("onnx", "data") if k in paths)
    more = f", {deploy.describe(spec)}" if deploy.describe(spec) else ""
    out.print(f"wrote {output} ({size / 2**20:.2f} MiB, op {op}, opset {opset}, {spec.dtype}, {layout}{more})")
    finish(output, spec, data, runtimes, options["report"], force, options["seed"])
    for kind, runtimes in (("ort", ORT_FORMAT_RUNTIMES), ("optimized", OPTIMIZED_RUNTIMES[spec.deploy.get("optimize_provider", "cpu")])):
        if kind in extra:
            out.print(f"wrote {paths[kind]} ({paths[kind].stat().st_size / 2**20:.2f} MiB)")
            verify_artifact(paths[kind], spec, runtimes, options["seed"])


# What can load the files written beside the model: an .ort file only ONNX Runtime; an optimised graph
# also onnx's evaluator where ORT kept to standard ops (it skips itself when a node is com.microsoft).
ORT_FORMAT_RUNTIMES = ("torch", "ort-cpu", "ort-cpu-noopt", "ort-cuda")
OPTIMIZED_RUNTIMES = {"cpu": ("torch", "ort-cpu", "ort-cpu-noopt", "onnx-reference"), "cuda": ("torch", "ort-cuda")}


def verify_artifact(path, spec, runtimes, seed):
    """Verify a file written beside the model (.ort, optimised graph) as read back from disk."""
    from pe_export.verify import check, verdict

    with out.status(f"verifying {path}"):
        rows = check(spec, path.read_bytes(), runtimes, seed=seed)
    print_rows(rows)
    result = verdict(rows)
    if result == "FAIL":
        fail(f"parity check failed for {path}; it is kept for inspection", 1)
    if result == "unverified":
        fail(f"no runtime here could run {path} ({spec.op}, {spec.dtype}); it is kept but unverified", 1)
    out.print(f"[green]verified[/green]: {path} matches the float64 reference on every runtime that ran")


PROVIDERS = {"cpu": "ort-cpu", "cuda": "ort-cuda"}  # the old --providers names


@app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="An ONNX file written by pe-export.")],
    runtimes: Annotated[
        Optional[str], typer.Option(help="Runtimes to check, comma separated: torch, ort-cpu, ort-cpu-noopt, ort-cuda, onnx-reference, openvino (default: all; absent ones are reported as skipped).")
    ] = None,  # fmt: skip
    providers: Annotated[Optional[str], typer.Option(help="Old form of --runtimes: ONNX Runtime providers cpu, cuda (torch and onnx-reference run too).")] = None,
    positions: Annotated[Optional[str], typer.Option(help="Also probe exactly these positions: integers and ranges a:b, comma separated (e.g. 0,131000:131072).")] = None,
    batch: Annotated[int, typer.Option(min=1, max=64, help="Batch size of the probes.")] = 2,
    probe_bounds: Annotated[bool, typer.Option("--probe-bounds", help="Also feed positions -1 and the table length, and report runtimes that do not fail on them.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Also write the report: FILE.json, or FILE.md for Markdown.")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="On failure, write the reproduction bundle here (default: FILE.repro beside the model).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report.")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random verification inputs.")] = 0,
    weights: Annotated[
        Optional[Path], typer.Option(help="Where the learned weights file the model was exported from is now.")
    ] = None,
):
    """Re-verify a file pe-export wrote against the float64 reference rebuilt from its embedded spec:
    positions over the whole table (its last rows always), a decode step and batch > 1, on every runtime."""
    import dataclasses

    from pe_export.export import load
    from pe_export.verify import DEFAULT_RUNTIMES, make_probes, parse_positions

    if runtimes is not None and providers is not None:
        fail("give --runtimes or --providers, not both")
    if providers is not None:
        names = [p.strip() for p in providers.split(",") if p.strip()]
        if not names or any(p not in PROVIDERS for p in names):
            fail(f"--providers takes a comma-separated list of {', '.join(PROVIDERS)}, got {providers!r}")
        chosen = ("torch", *[PROVIDERS[p] for p in names], "onnx-reference")
    else:
        chosen = parse_runtimes(runtimes) if runtimes is not None else DEFAULT_RUNTIMES
    try:
        wanted = parse_positions(positions) if positions is not None else None
        model, spec = load(file)
        if weights is not None:
            if "weights_sha256" not in spec.params:
                fail(f"{file} was exported with random weights (weights_seed); --weights does not apply")
            spec = dataclasses.replace(spec, params={**spec.params, "weights": str(weights.resolve())})
        if "weights_sha256" in spec.params:  # the learned tensor must still be there, unchanged
            from pe_export import weights as learned

            learned.load(learned.LearnedWeights(**{k: spec.params.get(k) for k in WEIGHT_FIELDS}))
        if wanted is not None:
            make_probes(spec, seed, batch, wanted)  # refuses positions outside the table, before any work
        check_report_path(report, file, force)
    except ValueError as e:
        fail(str(e))
    finish(file, spec, model.SerializeToString(), chosen, report, force, seed,
           batch=batch, positions=positions, probe_bounds=probe_bounds, bundle=bundle)  # fmt: skip


def check_report_path(report, model_path, force):
    from pe_export.errors import BadInput
    from pe_export.export import check_output_path

    if report is None:
        return
    if report.resolve() == model_path.resolve():
        raise BadInput(f"--report {str(report)!r} is the model file itself; name another file")
    check_output_path(report, force)


def print_rows(rows, bounds_rows=None):
    from pe_export.report import ROW_COLUMNS, row_cells

    table = Table(*ROW_COLUMNS)
    for r in rows:
        table.add_row(*row_cells(r.as_dict()))
    out.print(table)
    for r in rows:
        if r.note:
            out.print(f"  {r.runtime} {r.verdict}: {r.note}", soft_wrap=True)
    for b in bounds_rows or []:
        out.print(f"  out-of-range positions, {b.runtime}: {b.verdict}{': ' + b.note if b.note else ''}", soft_wrap=True)


def finish(path, spec, data, runtimes, report, force, seed, batch=2, positions=None, probe_bounds=False, bundle=None):
    """Verify, print the table, write the report (and a reproduction bundle on failure), exit 0 / 1."""
    import shlex

    from pe_export.export import write_atomic
    from pe_export.report import render, verify_doc
    from pe_export.verify import check, parse_positions, verdict, write_bundle
    from pe_export.verify import probe_bounds as run_probe_bounds

    wanted = parse_positions(positions) if positions else None
    with out.status("verifying"):
        rows = check(spec, data, runtimes, seed=seed, batch=batch, positions=wanted)
        bounds_rows = run_probe_bounds(spec, data, runtimes, seed=seed) if probe_bounds else None
    print_rows(rows, bounds_rows)
    result = verdict(rows)
    command = ["pe-export", "verify", str(path), "--runtimes", ",".join(runtimes), "--seed", str(seed), "--batch", str(batch)]
    command += ["--positions", positions] if positions else []
    command += ["--probe-bounds"] if probe_bounds else []
    if report:
        doc = verify_doc(path, spec, rows, result, bounds_rows, shlex.join(command))
        try:
            write_atomic(render(doc, report), report, force)
        except ValueError as e:  # the report path changed under us since it was checked
            fail(str(e))
        out.print(f"wrote {report}")
    if result == "FAIL":
        folder = free_folder(bundle or Path(f"{path}.repro"))
        try:
            write_bundle(folder, spec, data, rows, seed, batch, positions)
            out.print(f"wrote the reproduction bundle {folder} (README.txt has the command that re-runs the check)")
        except OSError as e:
            out.print(f"could not write the reproduction bundle {folder}: {e}")
        fail(f"parity check failed; {path} is kept for inspection", 1)
    if result == "unverified":
        fail(f"no runtime here could run {path} ({spec.op}, {spec.dtype}); it is kept but unverified", 1)
    if bounds_rows and any(b.verdict == "SILENT" for b in bounds_rows):
        silent = ", ".join(b.runtime for b in bounds_rows if b.verdict == "SILENT")
        out.print(f"[yellow]warning[/yellow]: {silent} returned results for positions outside the table: guard positions before calling it")
    out.print(f"[green]verified[/green]: {path} matches the float64 reference on every runtime that ran")


_matrix.register(app)
from pe_export.cli import rewrite as _rewrite  # noqa: E402
_rewrite.register(app)
tools.register(app)
_bench.register(app)


def run():
    app()
