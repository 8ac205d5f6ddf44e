"""The graph shapes `pe-export rewrite` recognises, one rule class per file (see pe_export.rewriter).

Each module registers its rule class in `RULES`; a rule class is built with the rewrite's `Job` and
is an `onnxscript.rewriter.pattern.RewriteRuleClassBase`: `pattern`, `check` (a failed `MatchResult`
carries the reason it does not apply), `rewrite`.
"""

from pe_export.registry import Registry

RULES = Registry("rewrite rule", "pe_export.rewriter.rules")
