"""Positions outside [0, P) fail loudly on every target under ORT CPU, and in the torch original."""

import numpy as np
import pytest
import torch
from conftest import exported, ort_cpu_session, rope_spec

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.spec import LAYOUTS

# The three kinds of graph: a table, two stacked tables behind a run-time switch, cos/sin computed in the graph.
GRAPHS = {
    "table": {},
    "switch": dict(
        scaling="longrope",
        scaling_params=dict(short_factor=[1.0] * 32, long_factor=[2.0] * 32, original_max_positions=128, factor=4.0),
    ),
    "computed": dict(scaling="dynamic", scaling_params=dict(factor=2.0, original_max_positions=128)),
}


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OP_TARGETS)
@pytest.mark.parametrize("bad", [256, 257, -1, -256])
def test_out_of_range_positions_fail_on_ort_cpu(op, layout, bad, graph):
    sess = ort_cpu_session(exported(rope_spec(op=op, layout=layout, **GRAPHS[graph])))
    x = np.zeros((1, 2, 3, 64) if layout == "bhsd" else (1, 3, 2, 64), dtype=np.float32)
    ok = np.array([[0, 1, 255]])
    sess.run(None, {"x": x, "position_ids": ok})  # the last row itself is fine
    with pytest.raises(Exception, match="(?i)out of range|out of bounds|invalid"):
        sess.run(None, {"x": x, "position_ids": np.array([[0, bad, 2]])})


@pytest.mark.parametrize("bad", [256, -1])
def test_out_of_range_positions_fail_in_torch(bad):
    from pe_export.encodings.rope import rope_module

    module = rope_module(rope_spec())
    with pytest.raises(IndexError, match=r"out of range \[0, 256\)"):
        module(torch.zeros(1, 1, 2, 64), torch.tensor([[0, bad]]))


def test_decomposed_guard_also_holds_in_the_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(exported(rope_spec(op="decomposed")))
    with pytest.raises(IndexError):
        ev.run(None, {"x": np.zeros((1, 1, 1, 64), np.float32), "position_ids": np.array([[-1]])})


def test_custom_op_passes_torch_opcheck():
    import pe_export.custom_ops.rotary  # noqa: F401

    x = torch.randn(2, 3, 4, 16)
    cos, sin = torch.randn(10, 6), torch.randn(10, 6)
    pos = torch.randint(0, 10, (2, 4))
    for interleaved in (False, True):
        torch.library.opcheck(torch.ops.pe_export.rotary_embedding.default, (x, cos, sin, pos, interleaved, 12, "bhsd"))
