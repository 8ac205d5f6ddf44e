"""The heavy optional runtimes (IREE: ~395 MB, its compiler per file), a marked group not run by
default: `python -m pytest -m heavy_runtimes`. What they do with each op target is measured, not
assumed: each target either passes or is "unsupported" with the compiler's reason, never a FAIL."""

import pytest
from conftest import exported, rope_spec

from pe_export.runtimes import RUNTIMES, Skip
from pe_export.spec import OP_NAMES
from pe_export.parity import check, probe_bounds

pytestmark = pytest.mark.heavy_runtimes


@pytest.mark.parametrize("op", OP_NAMES)
def test_iree_passes_or_says_why_it_cannot_compile(op):
    spec = rope_spec(op=op)
    try:
        RUNTIMES["iree"](spec, exported(spec))
    except Skip as e:
        pytest.skip(str(e))
    except Exception:
        pass  # an unsupported target: the row below must say so
    (row,) = check(spec, exported(spec), runtimes=("iree",))
    assert row.verdict in ("pass", "unsupported"), row
    assert row.verdict == "pass" and row.worst_ratio < 1 or row.note.startswith(("does not compile", "does not import"))
    if row.verdict == "pass":
        (bounds,) = probe_bounds(spec, exported(spec), runtimes=("iree",))
        assert bounds.verdict in ("loud", "SILENT", "ABORTS") and (bounds.verdict == "loud" or bounds.note)
