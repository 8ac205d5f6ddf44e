"""The registered rules of some kinds ("cos_sin", "rotation"), built for one rewrite, as one
onnxscript rule set: the first pass (cos/sin) and the second (q/k rotations) both take theirs here."""

from __future__ import annotations

from onnxscript.rewriter import pattern

from pe_export.rewriter.job import Job
from pe_export.rewriter.rules import RULES
from pe_export.rewriter.rules.base import as_rule


def rule_set(job: Job, kinds=("cos_sin",)) -> pattern.RewriteRuleSet:
    classes = [RULES.get(n) for n in RULES.names() if RULES.get(n).kind in kinds]
    rules = sorted((cls(job, fn) for cls in classes for fn in cls.functions), key=lambda r: (r.order, r.name))
    return pattern.RewriteRuleSet([as_rule(r) for r in rules], commute=True)
