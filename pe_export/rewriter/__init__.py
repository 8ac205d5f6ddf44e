"""`pe-export rewrite`: make the RoPE inside a whole exported model exact (float64-built tables), fused and verified.

    rewrite(model_or_path, config, seq=None, op="tables", output=None, force=False) -> Rewritten

Recognised graph shapes: one rule per file in `pe_export.rewriter.rules` (see each module's docstring).
"""

from pe_export.rewriter.api import rewrite

__all__ = ["rewrite"]
