"""pe-export: positional encodings of Transformer models as verified ONNX graphs.

The public API (each name documented where it is defined; docs/python-api.md):

    preset, rope_tables, translation_table    pe_export.api
    RotaryEmbedding, MRotaryEmbedding         pe_export.encodings.modules (nn.Modules)
    mrope_tables                              pe_export.encodings.mrope (M-RoPE per-token cos/sin, float64)
    export, verify                            pe_export.pipeline.artifact
    rewrite, rewrite_and_verify, audit        pe_export.rewriter (the RoPE inside a whole ONNX model)
    rope_layers, export_layers                pe_export.api (per-layer RoPE: Gemma 3, ModernBERT, NoPE layers)
    patch, unpatch, patched                   pe_export.patching (exact tables in a transformers model)
    BadInput                                  pe_export.errors

Names are imported on first use, so `import pe_export` (and `pe-export --help`) loads no torch.
"""

from __future__ import annotations

import importlib

from pe_export.spec import VERSION as __version__

_WHERE = {
    "preset": "pe_export.api",
    "rope_tables": "pe_export.api",
    "translation_table": "pe_export.api",
    "RotaryEmbedding": "pe_export.encodings.modules",
    "MRotaryEmbedding": "pe_export.encodings.modules",
    "mrope_tables": "pe_export.encodings.mrope",
    "export": "pe_export.pipeline.artifact",
    "verify": "pe_export.pipeline.artifact",
    "rewrite": "pe_export.rewriter",
    "rewrite_and_verify": "pe_export.rewriter",
    "audit": "pe_export.rewriter",
    "rope_layers": "pe_export.api",
    "export_layers": "pe_export.api",
    "patch": "pe_export.patching",
    "unpatch": "pe_export.patching",
    "patched": "pe_export.patching",
    "BadInput": "pe_export.errors",
}
__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pe_export' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__():
    return sorted([*globals(), *_WHERE])
