"""`rewrite`: data in, data out on an `onnx_ir.Model` (the file handling is in `pe_export.rewriter.files`).

Two passes of the same rule set: a dry pass (onnxscript's matching tracer: checks run, nothing changes)
that collects every site and every refusal, so that a config that disagrees with any site fails before
anything is touched; then the pass that rewrites.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx_ir as ir
from onnxscript.rewriter import _basics

from pe_export.errors import BadInput
from pe_export.rewriter import OPS
from pe_export.rewriter.job import Job, Site
from pe_export.rewriter.params import params_from_config
from pe_export.rewriter.rule_set import rule_set
from pe_export.rewriter.rules import RULES

METADATA_KEY = "pe_export.rewrite"


class DryRun(_basics.MatchingTracer):
    """onnxscript's tracer makes a pass dry (it applies nothing); nothing reads its log of the best
    partial matches, which costs a call per rule and node (~0.2 s on a 1,000-node Llama)."""

    def log(self, *args, **kwargs) -> None:
        pass


@dataclass
class Rewritten:
    """The rewritten model, its sites, and the spec written into its metadata."""

    model: ir.Model
    sites: list[Site]
    spec: dict = field(default_factory=dict)


def rewrite_model(model: ir.Model, config, seq: int | None = None, op: str = "tables") -> Rewritten:
    """Replace every recognised cos/sin computation of `model` by a Gather from float64-built tables of
    `seq` positions (default: the config's max_position_embeddings); with op onnx|ort|decomposed also each
    q/k rotation by pe-export's lowering. `model` itself is never modified: the passes run on a clone
    (nodes and values copied, weight tensors shared, so no weight bytes are copied), returned as
    `Rewritten.model`; a step that fails (the rotation pass after the cos/sin pass) leaves `model` as it
    was. Raises BadInput for a model with no site, a config that disagrees with a site, or a model this
    command already rewrote."""
    if op not in OPS:
        raise BadInput(f"--op must be one of {', '.join(OPS)}, got {op!r}")
    if METADATA_KEY in model.metadata_props:
        raise BadInput(
            "this model was already rewritten by pe-export rewrite (metadata 'pe_export.rewrite'); rewrite the original"
        )
    job = Job(params_from_config(config, seq), seq, op)
    model = model.clone()
    rules = rule_set(job)
    # Dry: onnxscript builds each replacement but applies none; forget what it built.
    rules.apply_to_model(model, tracer=DryRun())
    job.forget_built()
    if job.refused:
        raise BadInput(f"the config disagrees with the graph: {'; '.join(dict.fromkeys(job.refused))}")
    if not job.found:
        from pe_export.rewriter.nearest import nearest

        raise BadInput(f"no RoPE site found: {nearest(model)} (recognised shapes: {', '.join(RULES.names())})")
    rules.apply_to_model(model)
    for name in (
        n for site in job.sites for n in (site.inv_freq, *site.replaced)
    ):  # the float32 constants the tables replace
        old = model.graph.initializers.get(name)
        if old is not None and not old.uses() and old not in model.graph.outputs:
            del model.graph.initializers[name]
    unreached = [s for s in job.sites if s.seq_len is not None and s.seq_len > s.params["max_positions"]]
    if unreached:
        s = unreached[0]
        raise BadInput(
            f"--seq {s.params['max_positions']}: site {s.inv_freq!r} takes LongRoPE's long factors from "
            f"{s.seq_len} positions on (original_max_position_embeddings {s.seq_len - 1}), which a table of "
            f"{s.params['max_positions']} never reaches; pass --seq above {s.seq_len - 1}, or leave it out"
        )
    computed = [s.inv_freq for s in job.sites if not s.tables]
    if op != "tables" and computed:
        raise BadInput(
            f"--op {op}: site {computed[0]!r} is dynamic NTK: its cos/sin are computed at run time from "
            "max(position) + 1 (no table for pe-export's rotation lowerings to read); use --op tables"
        )
    if op != "tables":
        from pe_export.rewriter.lowering import replace_rotations

        replace_rotations(model, job)
    spec = {
        "version": 1,
        "op": op,
        "seq": seq,
        "sites": [s.to_dict() for s in job.sites],
    }
    model.metadata_props[METADATA_KEY] = json.dumps(spec)
    return Rewritten(model, job.sites, spec)
