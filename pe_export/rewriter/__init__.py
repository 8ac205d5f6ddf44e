"""`pe-export rewrite`: make the RoPE inside a whole exported model exact (float64-built tables), fused and verified.

    rewrite(model_or_path, config, seq=None, op="tables", output=None, force=False) -> Rewritten
    rewrite_and_verify(model, config, seq=None, op="tables", output=None, force=False, runtimes=..., report=None)
        -> RewriteRun: the rewrite checked site by site and as a whole model on each runtime (`pe-export rewrite`)

Recognised graph shapes: one rule per file in `pe_export.rewriter.rules` (see each module's docstring).

    in-graph cos/sin (kind "cos_sin"): cos_sin_mul[_factor], cos_sin_matmul[_factor], cos_sin_longrope,
        sincos_table; their rotations for --op onnx|ort|decomposed (kind "rotation"): rotate_half, rotate_pairs
    fused nodes reading (P, R/2) caches, constant or onnxscript's in-graph Range -> MatMul -> Cos/Sin
        (`rules.fused_cache`): rotary_embedding_node (com.microsoft and opset-23 RotaryEmbedding),
        gqa_rotary (com.microsoft::GroupQueryAttention with do_rotary=1)

Fused nodes under --op: tables keeps the node and swaps its caches; a RotaryEmbedding already of the
requested target (ort: contrib, onnx: standard) keeps its node too and counts as rotated; another is
converted by `fused_rotary` (onnx <-> ort, or decomposed for halves pairing on (B, H, S, D)), or refused
when the conversion would change its arithmetic. GroupQueryAttention keeps do_rotary on the new tables
under every --op: its rotation is ORT's attention kernel, which pe-export does not unfuse.
"""

from __future__ import annotations

import importlib

from pe_export.runtimes import GRAPH_RUNTIMES
from pe_export.spec import OP_NAMES

# The rewrite's choices, here so that the CLI's --help imports no onnxscript (the modules are lazy).
OPS = ("tables", *OP_NAMES)  # tables: swap cos/sin only; else also lower each q/k rotation to that target
RUNTIMES = tuple(GRAPH_RUNTIMES)  # every runtime can check a foreign graph (torch cannot: no module)
DEFAULT_RUNTIMES = ("ort-cpu", "ort-cpu-noopt")

_WHERE = {
    "rewrite": "pe_export.rewriter.apply",
    "rewrite_and_verify": "pe_export.rewriter.run",
    "audit": "pe_export.rewriter.site_audit",
}
__all__ = ["DEFAULT_RUNTIMES", "OPS", "RUNTIMES", *_WHERE]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pe_export.rewriter' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
