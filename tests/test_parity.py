"""Parity matrix generated from the registries: preset x op target x layout x dtype under ONNX Runtime
CPU, onnx's ReferenceEvaluator (where it implements the op) and the torch original, against the float64
reference, with the one tolerance table of `pe_export.verification.parity`."""

import itertools

import numpy as np
import onnx
import pytest
from conftest import exported

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.presets import PRESETS
from pe_export.spec import DTYPES, LAYOUTS, Spec
from pe_export.verification.parity import check, verdict

SEQ = 512  # short tables keep the matrix fast; the full preset lengths are exported in test_full_length


def preset_spec(preset, op, layout, dtype, seq=SEQ):
    params = {**PRESETS[preset].params, "max_positions": seq}
    return Spec(encoding="rope", params=params, op=op, opset=OP_TARGETS[op].min_opset, dtype=dtype, layout=layout)


ROPE_PRESETS = [name for name, p in PRESETS.items() if p.encoding == "rope"]  # the others: test_encodings.py
# Every preset on every target in fp32; every layout and dtype for the presets that each bring something
# of their own (plain, interleaved + partial, partial rotate-half, YaRN with mscale, LongRoPE's two
# tables). The rest of the product is marked slow (python -m pytest -m slow).
DISTINCT = ("llama-rope", "gpt-j-rope", "gpt-neox-rope", "deepseek-v3-rope", "phi3-mini-128k-rope")
MATRIX = [
    pytest.param(*c, id="-".join(c), marks=[] if c[0] in DISTINCT or c[2:] == ("bhsd", "fp32") else [pytest.mark.slow])
    for c in itertools.product(ROPE_PRESETS, OP_TARGETS, LAYOUTS, DTYPES)
]


@pytest.mark.parametrize("preset,op,layout,dtype", MATRIX)
def test_parity(preset, op, layout, dtype):
    spec = preset_spec(preset, op, layout, dtype)
    runtimes = ("torch", "ort-cpu", "ort-cpu-noopt", "onnx-reference")
    rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=runtimes)}
    failures = [f"{r.runtime}: {r.note}" for r in rows.values() if r.verdict == "FAIL"]
    assert not failures, failures
    assert rows["torch"].verdict == "pass"
    # Which runtimes must have run, and why the others may not:
    for ort in ("ort-cpu", "ort-cpu-noopt"):  # graph optimisations on (ORT's default) and off
        if dtype == "bf16":
            assert rows[ort].verdict == "skipped" and "no kernel" in rows[ort].note  # ORT CPU has no bf16 Mul/RoPE
        else:
            assert rows[ort].verdict == "pass" and rows[ort].provider.startswith("CPUExecutionProvider")
    if op == "ort":
        assert rows["onnx-reference"].verdict == "skipped"  # no com.microsoft ops in onnx's evaluator
    else:
        assert rows["onnx-reference"].verdict == "pass"
    assert verdict(list(rows.values())) == ("unverified" if (op, dtype) == ("ort", "bf16") else "pass")


@pytest.mark.parametrize("op", OP_TARGETS)
def test_graph_shape_of_each_target(op):
    model = onnx.load_from_string(exported(preset_spec("llama-rope", op, "bhsd", "fp32")))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    imports = {o.domain: o.version for o in model.opset_import}
    guard = [("", "Less"), ("", "Where")]  # negative positions -> one past the table (lowerings.py)
    if op == "onnx":
        assert ops == guard + [("", "RotaryEmbedding")] and imports[""] == 23
    elif op == "ort":
        assert ops == guard + [("com.microsoft", "RotaryEmbedding")]
    else:
        assert all(d == "" for d, _ in ops) and "RotaryEmbedding" not in {t for _, t in ops}
        assert imports[""] == OP_TARGETS[op].min_opset == 17
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in model.graph.input] == ["x", "position_ids"]
    assert dims(model.graph.input[0]) == ["batch", "heads", "seq", 128]
    assert dims(model.graph.input[1]) == ["batch", "seq"]
    assert [o.name for o in model.graph.output] == ["y"]


@pytest.mark.parametrize("op", OP_TARGETS)
def test_full_length_llama_loads_and_passes(op):
    """The main job's file, at its real length, for every target."""
    spec = preset_spec("llama-rope", op, "bhsd", "fp32", seq=8192)
    rows = check(spec, exported(spec), runtimes=("ort-cpu",))
    assert rows[0].verdict == "pass", rows[0]


@pytest.mark.parametrize(
    "op,opset", [(op, o) for op, t in OP_TARGETS.items() for o in (t.opsets()[0], t.opsets()[-1])], ids=str
)
def test_each_target_at_its_lowest_and_highest_opset(op, opset):
    spec = Spec(encoding="rope", params=dict(head_dim=64, rotary_dim=32, max_positions=64), op=op, opset=opset)
    model = onnx.load_from_string(exported(spec))
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert verdict(check(spec, exported(spec), runtimes=("ort-cpu", "onnx-reference"))) == "pass"


@pytest.mark.parametrize("op", OP_TARGETS)
def test_sequences_longer_than_the_table(op):
    """Positions must be < P; the fused ORT kernels also refuse S > P, even with valid positions."""
    from conftest import ort_cpu_session, rope_spec

    sess = ort_cpu_session(exported(rope_spec(op=op, max_positions=16)))
    x = np.zeros((1, 1, 17, 64), np.float32)
    ids = (np.arange(17) % 16)[None]
    if op == "decomposed":
        sess.run(None, {"x": x, "position_ids": ids})
    else:
        with pytest.raises(Exception, match="cos_cache"):
            sess.run(None, {"x": x, "position_ids": ids})


# One example of every registered scaling rule (short tables; switches inside them), exported on every target.
RULE_EXAMPLES = {
    "default": {},
    "linear": dict(factor=4.0),
    "ntk": dict(factor=4.0),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=128),
    "yarn": dict(factor=4.0, original_max_positions=128, mscale=1.0, mscale_all_dim=0.5),
    "longrope": dict(
        short_factor=[1.0 + i / 50 for i in range(32)],
        long_factor=[1.0 + i / 4 for i in range(32)],
        original_max_positions=128,
        factor=4.0,
    ),
    "dynamic": dict(factor=2.0, original_max_positions=128),
    "proportional": dict(partial_rotary_factor=0.5, factor=2.0),
}


def test_op_names_are_the_registered_targets():
    """The CLI's import-free list of targets (pe_export.spec.OP_NAMES) is the registry's, in order."""
    from pe_export.spec import OP_NAMES

    assert tuple(OP_TARGETS) == OP_NAMES


def test_every_rule_has_an_example():
    from pe_export.scaling import SCALING_RULES

    assert set(RULE_EXAMPLES) == set(SCALING_RULES.names())


@pytest.mark.parametrize("rule", RULE_EXAMPLES)
@pytest.mark.parametrize("op", OP_TARGETS)
def test_every_rule_exports_and_verifies(rule, op):
    params = dict(head_dim=64, max_positions=512, scaling=rule, scaling_params=RULE_EXAMPLES[rule])
    spec = Spec(encoding="rope", params=params, op=op, opset=OP_TARGETS[op].min_opset)
    rows = check(spec, exported(spec), runtimes=("torch", "ort-cpu", "onnx-reference"))
    assert verdict(rows) == "pass", [(r.runtime, r.note) for r in rows]


def test_float32_angles_mode_exports_and_verifies():
    spec = preset_spec("llama-rope", "onnx", "bhsd", "fp32")
    spec = Spec(**{**spec.__dict__, "params": {**spec.params, "angles": "float32"}})
    assert verdict(check(spec, exported(spec), runtimes=("ort-cpu",))) == "pass"


def test_a_corrupted_table_entry_fails_with_its_position():
    """Verification can fail: change one cos entry of an exported file and the row names the position."""
    spec = preset_spec("llama2-rope", "onnx", "bhsd", "fp32")
    model = onnx.load_from_string(exported(spec))
    table = next(t for t in model.graph.initializer if t.dims[0] == SEQ)
    values = onnx.numpy_helper.to_array(table).copy()
    values[300, 5] += 1e-3
    table.CopyFrom(onnx.numpy_helper.from_array(values, table.name))
    row = check(spec, model.SerializeToString(), runtimes=("ort-cpu",))[0]
    assert row.verdict == "FAIL" and "position 300" in row.where, row


def test_exports_are_byte_identical():
    from pe_export.pipeline.onnx_export import build

    spec = preset_spec("gpt-neox-rope", "decomposed", "bshd", "fp16")
    assert build(spec).SerializeToString() == build(spec).SerializeToString()


def test_deepseek_softmax_scale_factor_is_in_the_file():
    import json
    import math

    model = onnx.load_from_string(exported(preset_spec("deepseek-v3-rope", "onnx", "bhsd", "fp32")))
    derived = json.loads({p.key: p.value for p in model.metadata_props}["pe_export.derived"])
    assert derived["attention_factor"] == 1.0
    assert derived["softmax_scale_factor"] == pytest.approx((0.1 * math.log(40) + 1) ** 2)


def test_spec_round_trips_through_the_file():
    spec = preset_spec("gpt-j-rope", "ort", "bshd", "fp16")
    model = onnx.load_from_string(exported(spec))
    props = {p.key: p.value for p in model.metadata_props}
    assert Spec.from_json(props["pe_export.spec"]) == spec


def test_cuda_fallback_is_a_failure(monkeypatch):
    """ORT falls back to CPU silently; the ort-cuda row must say so, not pass."""
    ort = pytest.importorskip("onnxruntime")
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(
        ort, "InferenceSession", lambda data, opts, providers: real(data, opts, providers=["CPUExecutionProvider"])
    )
    monkeypatch.setattr(
        "pe_export.runtimes.worker.IN_PROCESS", {"torch", "ort-cuda"}
    )  # the patched ORT is in this process
    spec = preset_spec("llama-rope", "onnx", "bhsd", "fp32")
    row = check(spec, exported(spec), runtimes=("ort-cuda",))[0]
    assert row.verdict == "FAIL" and "CPUExecutionProvider" in row.note


def test_x_values_reach_the_comparison():
    """Guard against a vacuous check: a graph returning x unchanged must fail."""
    spec = preset_spec("llama-rope", "onnx", "bhsd", "fp32")
    model = onnx.load_from_string(exported(spec))
    node = model.graph.node[0]
    identity = onnx.helper.make_node("Identity", [node.input[0]], list(node.output))
    del model.graph.node[:]
    model.graph.node.append(identity)
    assert np.all([r.verdict == "FAIL" for r in check(spec, model.SerializeToString(), runtimes=("ort-cpu",))])
