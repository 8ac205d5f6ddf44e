"""DeBERTa disentangled attention: the exported layer on ONNX Runtime CPU and onnx's ReferenceEvaluator
against the float64 reference, and the reference, the torch module and the graph against transformers 5.23
(`models/deberta_v2/modeling_deberta_v2.py`: `DebertaV2Encoder` for the LayerNorm'ed relative embeddings
and the relative positions, its `DisentangledSelfAttention` for the layer) with the same seeded weights.

transformers computes q, k, v from hidden states with query_proj / key_proj / value_proj; the graph takes
them already projected. So the oracle runs the whole transformers layer on random hidden states, and the
graph gets that layer's own q, k, v (forward hooks hand transformers the copies rounded to the graph's dtype,
so both see the same inputs). transformers rounds sqrt(D * scale_factor) to float32 (`scaled_size_sqrt`)
even in float64: the exact comparisons round the reference's scale the same way, the others do not.
"""

import dataclasses
import math
import re

import numpy as np
import pytest
from conftest import assert_verified, exported, ort_cpu_session

from pe_export.dtypes import numpy_dtype
from pe_export.encodings import ENCODINGS, deberta
from pe_export.encodings.deberta import DebertaParams, learned, log_bucket, relative_index
from pe_export.spec import Spec
from pe_export.verification.parity import check
from pe_export.verification.tolerances import bound

torch = pytest.importorskip("torch")
hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")

SMALL = dict(heads=2, head_dim=16, position_buckets=32, max_relative_positions=64, max_positions=96)
# deberta-v3-base (encodings.md section 9): 12 heads of 64, 256 buckets, max_relative_positions -1 -> 512
V3_BASE = dict(
    heads=12,
    head_dim=64,
    position_buckets=256,
    max_relative_positions=-1,
    max_position_embeddings=512,
    pos_att_type="p2c|c2p",
    share_att_key=True,
    norm_rel_ebd=True,
    layer_norm_eps=1e-7,
    max_positions=512,
)
# Each switch off the v3 path at least once: no log buckets, c2p or p2c alone, separate position
# projections, no LayerNorm; (128, 513) is where float64 buckets differ from transformers' float32 ones.
VARIANTS = {
    "v3-small": SMALL,
    "c2p-plain": dict(
        heads=2,
        head_dim=16,
        position_buckets=-1,
        max_relative_positions=8,
        max_positions=40,
        pos_att_type="c2p",
        share_att_key=False,
        norm_rel_ebd=False,
    ),
    "p2c-128-513": dict(
        heads=3,
        head_dim=8,
        position_buckets=128,
        max_relative_positions=513,
        max_positions=300,
        pos_att_type="p2c",
        share_att_key=False,
    ),
    "both-no-share": dict(
        heads=2,
        head_dim=8,
        position_buckets=16,
        max_relative_positions=-1,
        max_position_embeddings=24,
        pos_att_type="c2p|p2c",
        share_att_key=False,
        max_positions=64,
    ),
}


def deberta_spec(dtype="fp32", **params) -> Spec:
    return Spec(encoding="deberta", params={**SMALL, **params}, op="decomposed", opset=17, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# transformers, with our seeded weights


def hf_layer(p: DebertaParams, x: np.ndarray, rounded=None, relative_pos=None):
    """transformers' output (B, H, L, D) for hidden states x (B, L, H*D) in float64, and its q, k, v
    (B, H, L, D). `rounded` {query, key, value}: arrays the projections of x are replaced with."""
    config = hf.DebertaV2Config(
        hidden_size=p.heads * p.head_dim,
        num_attention_heads=p.heads,
        num_hidden_layers=1,
        intermediate_size=4,
        relative_attention=True,
        position_buckets=p.position_buckets,
        max_relative_positions=p.max_relative_positions,
        max_position_embeddings=p.max_position_embeddings,
        pos_att_type=p.pos_att_type,
        share_att_key=p.share_att_key,
        norm_rel_ebd="layer_norm" if p.norm_rel_ebd else "none",
        layer_norm_eps=p.layer_norm_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    encoder = hf.DebertaV2Encoder(config).eval().double()
    attention = encoder.layer[0].attention.self
    w = {k: torch.from_numpy(v) for k, v in learned(p).items()}
    B, L, _ = x.shape
    split = lambda t: t.view(B, L, p.heads, p.head_dim).permute(0, 2, 1, 3)  # noqa: E731
    merge = lambda t: torch.from_numpy(np.asarray(t, dtype=np.float64)).permute(0, 2, 1, 3).reshape(B, L, -1)  # noqa: E731
    with torch.no_grad():
        encoder.rel_embeddings.weight.copy_(w["rel_embeddings"])
        if p.norm_rel_ebd:
            encoder.LayerNorm.weight.copy_(w["layer_norm_weight"])
            encoder.LayerNorm.bias.copy_(w["layer_norm_bias"])
        for proj in ("query_proj", "key_proj", "pos_query_proj", "pos_key_proj"):
            if hasattr(attention, proj):  # pos_* exist only without share_att_key, for the terms used
                getattr(attention, proj).weight.copy_(w[f"{proj}_weight"])
                getattr(attention, proj).bias.copy_(w[f"{proj}_bias"])
        hidden = p.heads * p.head_dim  # value_proj is outside the encoding: any fixed weights do
        value_weight = np.random.default_rng(99).standard_normal((hidden, hidden)) / math.sqrt(hidden)
        attention.value_proj.weight.copy_(torch.from_numpy(value_weight))
        attention.value_proj.bias.zero_()
        x = torch.from_numpy(x)
        qkv = [split(getattr(attention, f"{n}_proj")(x)) for n in ("query", "key", "value")]
        if rounded is not None:  # replace the projections of x (not those of the relative embeddings)
            for n in ("query", "key", "value"):
                getattr(attention, f"{n}_proj").register_forward_hook(
                    lambda mod, args, out, n=n: merge(rounded[n]) if args[0] is x else None
                )
        if relative_pos is None:
            relative_pos = encoder.get_rel_pos(x)
        out, _ = attention(
            x, torch.ones(B, 1, L, L), relative_pos=relative_pos, rel_embeddings=encoder.get_rel_embedding()
        )
    return split(out).numpy(), *(t.numpy() for t in qkv)


@pytest.fixture
def float32_scale(monkeypatch):
    """transformers' scale: sqrt(D * scale_factor) rounded to float32."""
    exact = deberta.scale
    monkeypatch.setattr(deberta, "scale", lambda p: float(np.float32(exact(p))))


def layer_inputs(q, k, v, positions, Q=None):
    """Graph inputs for the last Q queries over all keys at `positions`."""
    Q = Q or len(positions)
    return {
        "query": q[:, :, -Q:].copy(),
        "key": k,
        "value": v,
        "query_positions": positions[-Q:].copy(),
        "key_positions": positions,
    }


# ------------------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize(
    "buckets,max_relative", [(256, 512), (128, 513), (32, 64), (6, 9), (2, 3), (512, 4096), (64, 40)]
)
def test_buckets_match_transformers(buckets, max_relative):
    """Every distance in (-P, P), P = 2 * max_relative + 300 (past saturation): the bucket and the clamped
    row against `make_log_bucket_position` and transformers' clamp."""
    p = DebertaParams(heads=1, position_buckets=buckets, max_relative_positions=max_relative)
    P = 2 * max_relative + 300
    rel = np.arange(1 - P, P)
    want = hf.make_log_bucket_position(torch.from_numpy(rel), buckets, max_relative).long().numpy()
    np.testing.assert_array_equal(log_bucket(p, rel), want)
    np.testing.assert_array_equal(relative_index(p, rel), np.clip(want + buckets, 0, 2 * buckets - 1))


def test_float64_buckets_differ_where_transformers_is_exact():
    """(128, 513): log(2) / log(8) * 63 = 21 exactly; float32 gives 21, float64 21.000000000000004 -> 22."""
    p = DebertaParams(heads=1, position_buckets=128, max_relative_positions=513)
    assert log_bucket(p, np.array([128, -128, 256])).tolist() == [85, -85, 106]
    assert math.ceil(math.log(128 / 64) / math.log(512 / 64) * 63) == 22  # what float64 would give


def test_bucket_vectors():
    """encodings.md section 10, (256, 512), rel = query - key."""
    p = DebertaParams(heads=1, position_buckets=256, max_relative_positions=512)
    vectors = {0: 0, 127: 127, 128: 128, 129: 129, 200: 169, 300: 207, 511: 255, 1000: 317, -129: -129, -1000: -317}
    assert dict(zip(vectors, log_bucket(p, np.array(list(vectors))).tolist())) == vectors


def test_no_buckets_is_plain_clamp():
    p = DebertaParams(heads=1, position_buckets=0, max_relative_positions=8)
    rel = np.arange(-20, 21)
    np.testing.assert_array_equal(relative_index(p, rel), np.clip(rel + 8, 0, 15))


def test_bucket_is_odd_and_monotone():
    p = DebertaParams(**V3_BASE)
    rel = np.arange(-3000, 3001)
    b = log_bucket(p, rel)
    np.testing.assert_array_equal(b, -b[::-1])
    assert np.all(np.diff(b) >= 0)


def test_graph_table_matches_transformers():
    """The index table stored in the module: row of rel (query - key) at rel + P - 1."""
    spec = deberta_spec(**V3_BASE)
    P = 512
    table = ENCODINGS.get("deberta").module(spec).row_of.numpy()
    rel = torch.arange(1 - P, P)
    want = torch.clamp(hf.make_log_bucket_position(rel, 256, 512).long() + 256, 0, 511).numpy()
    np.testing.assert_array_equal(table, want)


# ------------------------------------------------------------------------------------------------
# Reference and torch module against transformers


@pytest.mark.parametrize("offset", [0, 17])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_matches_transformers(name, offset, float32_scale):
    """Q = K = all positions the table holds (shifted by `offset`: only query - key enters)."""
    p = DebertaParams(**VARIANTS[name])
    L = p.max_positions - offset
    x = np.random.default_rng(1).standard_normal((2, L, p.heads * p.head_dim))
    want, q, k, v = hf_layer(p, x)
    spec = Spec(encoding="deberta", params=VARIANTS[name], op="decomposed", opset=17)
    got = ENCODINGS.get("deberta").reference(spec, layer_inputs(q, k, v, np.arange(offset, offset + L)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_reference_matches_transformers_v3_base(float32_scale):
    p = DebertaParams(**V3_BASE)
    x = np.random.default_rng(2).standard_normal((1, 512, 768))
    want, q, k, v = hf_layer(p, x)
    spec = deberta_spec(**V3_BASE)
    got = ENCODINGS.get("deberta").reference(spec, layer_inputs(q, k, v, np.arange(512)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_c2p_decoding_matches_transformers(float32_scale):
    """c2p alone: transformers takes Q != K (query_states) with relative_pos given; here the queries are
    the last 5 of 40 keys, so relative_pos is the bucket of their position differences."""
    params = VARIANTS["c2p-plain"]
    p = DebertaParams(**params)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 40, p.heads * p.head_dim))
    _, q, k, v = hf_layer(p, x)
    positions = np.arange(40)
    rel = torch.from_numpy(positions[-5:, None] - positions[None, :])[None]  # (1, Q, K), query - key
    config = hf.DebertaV2Config(
        hidden_size=p.heads * p.head_dim,
        num_attention_heads=p.heads,
        relative_attention=True,
        position_buckets=-1,
        max_relative_positions=8,
        pos_att_type="c2p",
        share_att_key=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    attention = hf.DisentangledSelfAttention(config).eval().double()
    w = {n: torch.from_numpy(a) for n, a in learned(p).items()}
    with torch.no_grad():
        for proj in ("query_proj", "key_proj", "pos_key_proj"):
            getattr(attention, proj).weight.copy_(w[f"{proj}_weight"])
            getattr(attention, proj).bias.copy_(w[f"{proj}_bias"])
        hv = torch.from_numpy(v).permute(0, 2, 1, 3).reshape(2, 40, -1)
        attention.value_proj.register_forward_hook(lambda mod, args, out: hv)  # the same v as hf_layer's
        xt = torch.from_numpy(x)
        out, _ = attention(
            xt, torch.ones(2, 1, 5, 40), query_states=xt[:, -5:], relative_pos=rel, rel_embeddings=w["rel_embeddings"]
        )
    want = out.view(2, 5, p.heads, p.head_dim).permute(0, 2, 1, 3).numpy()
    spec = Spec(encoding="deberta", params=params, op="decomposed", opset=17)
    got = ENCODINGS.get("deberta").reference(spec, layer_inputs(q, k, v, positions, Q=5))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_decoding_equals_rows_of_full_attention():
    """No mask: the output of the last Q queries over K keys is the last Q rows of the K x K layer, for
    any Q. This is how p2c is defined for Q != K (transformers' p2c raises for Q != K)."""
    spec = deberta_spec(**VARIANTS["both-no-share"])
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 2, 30, 8)) for _ in range(3))
    positions = np.arange(34, 64)
    full = ENCODINGS.get("deberta").reference(spec, layer_inputs(q, k, v, positions))
    for Q in (1, 7):
        got = ENCODINGS.get("deberta").reference(spec, layer_inputs(q, k, v, positions, Q))
        np.testing.assert_allclose(got, full[:, :, -Q:], rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("Q", [96, 1, 9])
def test_torch_and_onnx_match_transformers(Q, dtype):
    """The torch module and the exported graph (ORT CPU) in fp32 and fp16, against transformers in float64
    on the same rounded q, k, v, within the rounding bound; Q < K: the last Q rows of transformers' K x K."""
    spec = deberta_spec(dtype)
    p = DebertaParams(**spec.params)
    x = np.random.default_rng(5).standard_normal((2, 96, p.heads * p.head_dim))
    _, q, k, v = hf_layer(p, x)
    rounded = {n: a.astype(numpy_dtype(dtype)) for n, a in (("query", q), ("key", k), ("value", v))}
    want, *_ = hf_layer(p, x, rounded=rounded)
    inputs = layer_inputs(rounded["query"], rounded["key"], rounded["value"], np.arange(96), Q)
    want = want[:, :, -Q:]
    limit = bound(spec, inputs)
    with torch.no_grad():
        eager = ENCODINGS.get("deberta").module(spec)(*(torch.from_numpy(a) for a in inputs.values())).double().numpy()
    graph = ort_cpu_session(exported(spec)).run(None, inputs)[0].astype(np.float64)
    for name, got in (("torch", eager), ("ort-cpu", graph)):
        err = np.abs(got - want)
        assert np.all(err <= limit), (
            f"{name}: max abs error {err.max():.3g}, worst error/bound {np.max(err / limit):.3g}"
        )


# ------------------------------------------------------------------------------------------------
# Parity of the exported graph (verify.check: prefill, decode Q=1, cached Q != K, start, and every distance)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_parity(dtype):
    rows = assert_verified(deberta_spec(dtype))
    assert {"decode", "cached", "distances"} <= set(rows["torch"].probes)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "v3-small"])
def test_parity_variants(name):
    spec = Spec(encoding="deberta", params=VARIANTS[name], op="decomposed", opset=17, dtype="fp32")
    rows = check(spec, exported(spec), runtimes=("ort-cpu", "onnx-reference"))
    assert all(r.verdict == "pass" for r in rows), [r.note for r in rows]


def test_graph_holds_no_float_bucket_math():
    import onnx

    model = onnx.load_from_string(exported(deberta_spec()))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Log", "Ceil", "Sign", "LayerNormalization", "Sqrt"}, ops  # all of it is in the tables


# ------------------------------------------------------------------------------------------------
# Properties


def test_shifting_every_position_changes_nothing():
    spec = deberta_spec()
    sess = ort_cpu_session(exported(spec))
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 24, 16)).astype(np.float32) for _ in range(3))
    inputs = layer_inputs(q, k, v, np.arange(24), Q=8)
    base = sess.run(None, inputs)[0]
    for shift in (1, 40, 96 - 24):
        moved = inputs | {n: inputs[n] + shift for n in ("query_positions", "key_positions")}
        # exact: the same graph on the same shapes and values (the rows r do not move), so the same kernels
        np.testing.assert_array_equal(sess.run(None, moved)[0], base)


def test_saturated_keys_are_interchangeable():
    """Keys farther than max_relative_positions - 1 on one side read the same row: permuting them (with
    their values) changes nothing; nearer keys are told apart."""
    spec = deberta_spec()
    ref = ENCODINGS.get("deberta").reference
    rng = np.random.default_rng(7)
    q, k, v = (
        rng.standard_normal((1, 2, 1, 16)),
        rng.standard_normal((1, 2, 12, 16)),
        rng.standard_normal((1, 2, 12, 16)),
    )
    far = {
        "query": q,
        "key": k,
        "value": v,
        "query_positions": np.array([95]),
        "key_positions": np.arange(12),
    }  # rel >= 84
    perm = rng.permutation(12)
    swapped = far | {"key": k[:, :, perm], "value": v[:, :, perm]}
    np.testing.assert_allclose(ref(spec, swapped), ref(spec, far), rtol=0, atol=1e-12)
    near = far | {"query_positions": np.array([20])}
    assert np.abs(ref(spec, near | {n: swapped[n] for n in ("key", "value")}) - ref(spec, near)).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Out-of-range positions and bad parameters

OUT_OF_RANGE = [([96], [0, 95]), ([-1], [0, 1]), ([3], [0, 96]), ([3], [-1, 2]), ([200], [-97, 2])]


@pytest.mark.parametrize("qp,kp", OUT_OF_RANGE, ids=str)
def test_out_of_range_positions_fail(qp, kp):
    import onnx
    from onnx.reference import ReferenceEvaluator

    spec = deberta_spec()
    rng = np.random.default_rng(8)
    lengths = {"query": len(qp), "key": len(kp), "value": len(kp)}
    inputs = {n: rng.standard_normal((1, 2, L, 16)).astype(np.float32) for n, L in lengths.items()}
    inputs |= {"query_positions": np.array(qp, dtype=np.int64), "key_positions": np.array(kp, dtype=np.int64)}
    with pytest.raises(IndexError, match="position out of range"):
        ENCODINGS.get("deberta").reference(spec, inputs)
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(exported(spec), opts, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="out of data bounds"):
        sess.run(None, inputs)
    with pytest.raises(IndexError):
        ReferenceEvaluator(onnx.load_from_string(exported(spec))).run(None, inputs)


def test_last_position_is_in_range():
    spec = deberta_spec()
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((1, 2, 96, 16)).astype(np.float32) for _ in range(3))
    inputs = layer_inputs(q, k, v, np.arange(96), Q=1)  # query 95, keys 0..95
    out = ort_cpu_session(exported(spec)).run(None, inputs)[0]
    np.testing.assert_allclose(out, ENCODINGS.get("deberta").reference(spec, inputs), rtol=0, atol=1e-5)


BAD = [
    (dict(heads=0), "heads must be an integer >= 1, got 0"),
    (dict(head_dim=-4), "head_dim must be an integer >= 1, got -4"),
    (dict(head_dim=8.0), "head_dim must be an integer >= 1, got 8.0"),
    (dict(max_positions=0), "max_positions must be an integer >= 1, got 0"),
    (dict(max_position_embeddings=True), "max_position_embeddings must be an integer >= 1, got True"),
    (dict(position_buckets=1), "position_buckets must be >= 2, or <= 0 for no log buckets, got 1"),
    (dict(position_buckets=2.5), "position_buckets must be an integer, got 2.5"),
    (dict(max_relative_positions="512"), "max_relative_positions must be an integer, got '512'"),
    (
        dict(position_buckets=32, max_relative_positions=17),
        "log buckets need max_relative_positions > position_buckets // 2 + 1 = 17, got 17",
    ),
    (
        dict(position_buckets=256, max_relative_positions=-1, max_position_embeddings=100),
        "log buckets need max_relative_positions > position_buckets // 2 + 1 = 129, got 100 (max_position_embeddings",
    ),
    (dict(pos_att_type="c2p|p2p"), "pos_att_type must be 'c2p', 'p2c' or 'p2c|c2p' (each at most once), got 'c2p|p2p'"),
    (dict(pos_att_type=""), "pos_att_type must be 'c2p', 'p2c' or 'p2c|c2p'"),
    (dict(pos_att_type="c2p|c2p"), "pos_att_type must be 'c2p', 'p2c' or 'p2c|c2p'"),
    (dict(pos_att_type=["c2p"]), "pos_att_type must be a string such as 'p2c|c2p', got ['c2p']"),
    (dict(share_att_key=1), "share_att_key must be true or false, got 1"),
    (dict(norm_rel_ebd="layer_norm"), "norm_rel_ebd must be true or false, got 'layer_norm'"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be a finite number > 0, got 0.0"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be a finite number > 0, got nan"),
    (dict(weights_seed=-1), "weights_seed must be an integer >= 0"),
    (dict(weights="w.safetensors", key="t"), "seeded random weights only"),
]


@pytest.mark.parametrize("params,message", BAD, ids=[m for _, m in BAD])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DebertaParams(**{**SMALL, **params})


def test_defaults_and_spans():
    p = DebertaParams(heads=12)
    assert (p.head_dim, p.position_buckets, p.max_relative_positions, p.max_position_embeddings) == (64, 256, -1, 512)
    assert (p.pos_att_type, p.share_att_key, p.norm_rel_ebd, p.layer_norm_eps, p.max_positions) == (
        "p2c|c2p",
        True,
        True,
        1e-7,
        512,
    )
    assert deberta.att_span(p) == 256 and deberta.relative_span(p) == 512
    assert deberta.scale(p) == math.sqrt(64 * 3) and deberta.scale(
        dataclasses.replace(p, pos_att_type=" C2P ")
    ) == math.sqrt(128)
    no_buckets = dataclasses.replace(p, position_buckets=0, max_relative_positions=128)
    assert deberta.att_span(no_buckets) == 128 and learned(no_buckets)["rel_embeddings"].shape == (256, 768)
