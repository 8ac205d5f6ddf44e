"""Parity matrix of every non-RoPE preset, generated from the preset table: fp32 and fp16 (bf16 through
onnx's evaluator) under ONNX Runtime CPU, onnx's ReferenceEvaluator and the torch original, against the
float64 reference, at the preset's own table length (probes reach its last position, with Q != K);
the same inside an attention layer (--attention); and out-of-range positions failing everywhere."""

import itertools

import numpy as np
import onnx
import pytest
from conftest import assert_verified, exported, ort_cpu_session

from pe_export.encodings import ENCODINGS, KINDS
from pe_export.encodings.attention import encoding_for
from pe_export.presets import PRESETS
from pe_export.spec import Spec
from pe_export.verification.parity import check

OTHERS = [name for name, p in PRESETS.items() if p.encoding not in ("rope", "mrope")]  # RoPE family: own files
WITH_LAYER = [name for name in OTHERS if ENCODINGS.get(PRESETS[name].encoding).kind in ("absolute", "bias")]


def spec_for(preset, dtype="fp32", **extra):
    p = PRESETS[preset]
    return Spec(encoding=p.encoding, params={**p.params, **extra}, op="decomposed", opset=17, dtype=dtype)


@pytest.mark.parametrize("preset,dtype", list(itertools.product(OTHERS, ["fp32", "fp16"])))
def test_preset_parity(preset, dtype):
    assert_verified(spec_for(preset, dtype))


@pytest.mark.parametrize("preset", [n for n in OTHERS if ENCODINGS.get(PRESETS[n].encoding).kind != "attention"])
def test_preset_parity_bf16(preset):
    assert_verified(spec_for(preset, "bf16"))  # bf16 crosses ORT's Python API as bits (runtimes.py)


@pytest.mark.parametrize("preset,dtype", list(itertools.product(WITH_LAYER, ["fp32", "fp16"])))
def test_preset_in_an_attention_layer(preset, dtype):
    seq = min(PRESETS[preset].params.get("max_positions") or 512, 512)
    spec = spec_for(preset, dtype, attention=True, max_positions=seq)
    assert_verified(spec)
    model = onnx.load_from_string(exported(spec))
    assert [i.name for i in model.graph.input] == ["query", "key", "value", "query_positions", "key_positions"]
    assert [o.name for o in model.graph.output] == ["output"]


def test_rope_in_an_attention_layer():
    for op, opset in (("onnx", 23), ("ort", 18), ("decomposed", 17)):
        spec = Spec(
            encoding="rope",
            params=dict(head_dim=64, max_positions=256, theta=10000.0, attention=True, attention_causal=True),
            op=op,
            opset=opset,
        )
        rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=("torch", "ort-cpu"))}
        assert all(r.verdict == "pass" for r in rows.values()), [r.note for r in rows.values()]


INPUTS = {
    "absolute": [("position_ids", ["batch", "seq"])],
    "bias": [("query_positions", ["q"]), ("key_positions", ["k"])],
    "attention": [
        ("query", ["batch", "H", "q", "D"]),
        ("key", ["batch", "H", "k", "D"]),
        ("value", ["batch", "H", "k", "D"]),
        ("query_positions", ["q"]),
        ("key_positions", ["k"]),
    ],
}
INPUTS["rotary"] = [("x", ["batch", "heads", "seq", "D"]), ("position_ids", ["batch", "seq"])]
OUTPUTS = {"absolute": "embeddings", "bias": "bias", "attention": "output", "rotary": "y"}


@pytest.mark.parametrize("preset", OTHERS)
def test_graph_contract(preset):
    """Input and output names and symbolic dims, opset 17, plain ops only."""
    spec = spec_for(preset, max_positions=64)
    kind = ENCODINGS.get(spec.encoding).kind
    model = onnx.load_from_string(exported(spec))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    got = [(i.name, dims(i)) for i in model.graph.input]
    want = INPUTS[kind]
    if kind in ("attention", "rotary"):
        H, D = spec.params.get("heads"), spec.params["head_dim"]
        want = [(n, [H if d == "H" else D if d == "D" else d for d in ds]) for n, ds in want]
        if spec.encoding == "transformer-xl":  # positions implicit: memory then segment
            want = want[:3]
    assert got == want
    assert [o.name for o in model.graph.output] == [OUTPUTS[kind]]
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}


def test_every_encoding_has_a_preset_and_a_known_kind():
    assert {p.encoding for p in PRESETS.values()} == set(ENCODINGS.names())
    assert all(ENCODINGS.get(n).kind in KINDS and ENCODINGS.get(n).reference_impl for n in ENCODINGS.names())


def test_attention_layer_differs_from_no_encoding():
    """The layer is not passing the encoding through unused: zeroing it changes the output."""
    spec = spec_for("bloom-alibi", attention=True, max_positions=128)
    _, inputs = encoding_for(spec).probes(spec, np.random.default_rng(0))[0]
    q, k, v = (inputs[n].astype(np.float64) for n in ("query", "key", "value"))
    logits = q @ k.swapaxes(-1, -2) / 8.0
    logits = np.where(inputs["key_positions"][None, :] > inputs["query_positions"][:, None], -np.inf, logits)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    plain = (e / e.sum(-1, keepdims=True)) @ v
    assert np.max(np.abs(encoding_for(spec).reference(spec, inputs) - plain)) > 1e-2


def bad_position_inputs(spec, P):
    """One probe with a position of P, and one with -1, for each position input of the contract."""
    enc = encoding_for(spec)
    _, inputs = enc.probes(spec, np.random.default_rng(0))[-1]
    for name in [n for n in inputs if "position" in n]:
        for bad in (P, -1):
            changed = {k: v.copy() for k, v in inputs.items()}
            changed[name].reshape(-1)[-1] = bad
            yield name, bad, changed


@pytest.mark.parametrize("preset", OTHERS + [f"{n}+attention" for n in WITH_LAYER])
def test_positions_out_of_range_fail_everywhere(preset):
    name, _, layer = preset.partition("+")
    spec = spec_for(name, max_positions=64, **({"attention": True} if layer else {}))
    enc = encoding_for(spec)
    if enc.kind == "attention" and "query_positions" not in enc.probes(spec, np.random.default_rng(0))[0][1]:
        pytest.skip("no position inputs: key length is bounded instead (see its own tests)")
    sess = ort_cpu_session(exported(spec))
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(onnx.load_from_string(exported(spec)))
    for _, _, inputs in bad_position_inputs(spec, 64):
        with pytest.raises(Exception, match="out of|index|bounds|range"):
            sess.run(None, inputs)
        with pytest.raises(IndexError):
            enc.reference(spec, inputs)
        with pytest.raises(Exception):  # noqa: B017 (onnx's evaluator raises whatever NumPy raises)
            ev.run(None, inputs)


def test_an_encoding_with_a_query_or_key_role_refuses_the_attention_layer():
    """xPos scales queries up and keys down: one module for both would export a layer that is not xPos."""
    from pe_export.pipeline.onnx_export import check_spec

    with pytest.raises(ValueError, match="treats queries and keys differently"):
        check_spec(spec_for("xpos", attention=True))
