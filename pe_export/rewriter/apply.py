"""The file handling around `rewrite_model`: load (external data kept lazy), rewrite, write atomically
(`output.Output`: a large model's external data copied while the rewrite runs)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from pe_export.errors import BadInput
from pe_export.files import check_output_path
from pe_export.rewriter.core import Rewritten, rewrite_model
from pe_export.rewriter.output import Output


def load(path: Path | str) -> ir.Model:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"model {str(path)!r} does not exist or is not a file")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf's DecodeError and friends
        raise BadInput(f"{str(path)!r} is not an ONNX model ({type(e).__name__})") from None
    check_external_data(model, path)
    return model


def check_external_data(model: ir.Model, path: Path) -> None:
    """BadInput, before anything runs or is written, when an external data file the model reads is
    missing or shorter than its tensors need (a copy cut short: they are read lazily, at the end)."""
    sizes: dict[Path, int] = {}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if not isinstance(t, ir.ExternalTensor):
            continue
        file = Path(t.base_dir) / t.location
        if file not in sizes:
            if not file.is_file():
                raise BadInput(
                    f"{str(path)!r} reads its weights from {str(file)!r}, which does not exist "
                    "(the external data file must lie beside the model, as it was written)"
                )
            sizes[file] = file.stat().st_size
        end = (t.offset or 0) + (t.length if t.length is not None else t.nbytes)
        if end > sizes[file]:
            raise BadInput(
                f"{str(file)!r} is truncated: {name!r} needs bytes up to {end}, the file has {sizes[file]} "
                f"(the external data of {str(path)!r} must be complete)"
            )


def prune(model: ir.Model) -> None:
    """Drop the nodes and initializers nothing reads any more (the replaced cos/sin computations; with
    --op onnx|ort|decomposed, the site's full-width cos/sin the old rotations read)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def save(model: ir.Model, path: Path, force: bool, output: Output | None = None) -> None:
    """Write `model` to `path` through `files.staged`; weights over files.EXTERNAL_DATA_THRESHOLD, or
    read from external data, go to `path.name + ".data"` beside it (external data in, external data
    out), renamed into place first. `output`: the `Output` whose copy of the original's external data
    started before the rewrite (else one starts here). The model in memory is left unchanged."""
    path = Path(path)
    check_output_path(path, force)
    prune(model)
    if output is not None:
        output.write(model)
        return
    with Output(path, force, model) as out:
        out.write(model)


def rewrite(
    model_or_path, config, seq: int | None = None, op: str = "tables", output=None, force: bool = False
) -> Rewritten:
    """Rewrite the RoPE of `model_or_path` (an `onnx_ir.Model`, an `onnx.ModelProto`, or a path) with the
    RoPE parameters of the local `config` (a config.json path), and write it to `output` if given.
    An `onnx_ir.Model` passed in is left unchanged, whether the rewrite succeeds or fails: the result's
    `model` is a rewritten clone (see `rewrite_model`)."""
    import onnx

    if isinstance(model_or_path, ir.Model):
        model = model_or_path
    elif isinstance(model_or_path, onnx.ModelProto):
        model = ir.from_proto(model_or_path)
    else:
        model = load(model_or_path)
    if output is None:
        return rewrite_model(model, config, seq, op)
    check_output_path(Path(output), force)
    with Output(output, force, model) as out:  # the original's external data is copied while the rewrite runs
        result = rewrite_model(model, config, seq, op)
        save(result.model, Path(output), force, out)
    return result


def describe(model: ir.Model) -> str:
    """What the graph alone says about its RoPE: float32 constants named like an `inv_freq`, with the
    rotary dim and theta they imply (theta read off the second frequency, exact for unscaled RoPE)."""
    found = []
    for name, v in model.graph.initializers.items():
        if "inv_freq" in name and v.const_value is not None:
            g = v.const_value.numpy().reshape(-1).astype("float64")
            theta = f", theta ~{g[1] ** (-g.size):.6g}" if g.size > 1 and g[1] > 0 else ""
            found.append(f"{name!r}: rotary dim {2 * g.size}{theta}")
    return "the graph holds " + "; ".join(found) if found else "the graph holds no constant named like an inv_freq"
