"""Bias encodings (T5, ALiBi) against transformers 5.23, Press's original slopes and the hand-computed
vectors of shared/reference/encodings.md section 10."""

import math

import numpy as np
import pytest
import torch

from pe_export.encodings import alibi, t5_bias
from pe_export.encodings.alibi import AlibiParams
from pe_export.encodings.t5_bias import T5BiasParams
from pe_export.spec import Spec

# --------------------------------------------------------------------------------------------------
# T5


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 256), (8, 20), (33, 100)])
def test_t5_buckets_are_transformers_for_every_distance(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    p = T5BiasParams(
        heads=2, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional, max_positions=4096
    )
    rel = torch.arange(-4095, 4096)
    want = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance).numpy()
    assert np.array_equal(t5_bias.buckets(p, rel.numpy()), want)


def test_t5_section_10_vectors():
    enc = T5BiasParams(heads=1)
    dec = T5BiasParams(heads=1, bidirectional=False)
    for rel, bucket in {
        -200: 15,
        -128: 15,
        -64: 14,
        -16: 10,
        -8: 8,
        -7: 7,
        -1: 1,
        0: 0,
        1: 17,
        7: 23,
        8: 24,
        16: 26,
        64: 30,
        127: 31,
        200: 31,
    }.items():
        assert t5_bias.buckets(enc, np.array(rel)) == bucket, rel
    for rel, bucket in {-300: 31, -128: 31, -64: 26, -32: 21, -16: 16, -15: 15, -1: 1, 0: 0, 5: 0, 300: 0}.items():
        assert t5_bias.buckets(dec, np.array(rel)) == bucket, rel


def test_t5_buckets_are_monotone_in_distance():
    for p in (T5BiasParams(heads=1), T5BiasParams(heads=1, bidirectional=False)):
        past = t5_bias.buckets(p, -np.arange(2000))  # keys ever further behind the query
        assert np.all(np.diff(past) >= 0) and past[-1] == (p.num_buckets // (2 if p.bidirectional else 1)) - 1


@pytest.mark.parametrize("is_decoder", [False, True])
def test_t5_compute_bias_with_the_same_table(is_decoder):
    """transformers' compute_bias with a cache (past_seen_tokens, so Q != K) against our reference."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(
        d_model=32,
        d_kv=8,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        is_decoder=is_decoder,
    )
    attn = T5Attention(config, has_relative_attention_bias=True).eval()
    spec = Spec(
        encoding="t5-bias", params=dict(heads=4, bidirectional=not is_decoder, max_positions=512, weights_seed=5)
    )
    with torch.no_grad():
        attn.relative_attention_bias.weight.copy_(torch.from_numpy(t5_bias.table(T5BiasParams(**spec.params))))
    for q_len, k_len, past in ((7, 7, 0), (1, 300, 299), (5, 511, 506), (512, 512, 0)):
        with torch.no_grad():
            want = attn.compute_bias(q_len, k_len, past_seen_tokens=past).double().numpy()
        got = t5_bias.reference(
            spec, {"query_positions": np.arange(past, past + q_len), "key_positions": np.arange(k_len)}
        )
        scale = np.abs(want).max()
        assert np.max(np.abs(got - want)) <= 2.0**-24 * scale  # transformers holds the table in float32


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(heads=0), "heads must be an integer >= 1"),
        (dict(heads=2, num_buckets=2), "num_buckets must be >= 4 in bidirectional mode"),
        (dict(heads=2, num_buckets=32, max_distance=8), "max_distance must be > 8"),
        (dict(heads=2, num_buckets=32, max_distance=16, bidirectional=False), "max_distance must be > 16"),
        (dict(heads=2, max_positions=-1), "max_positions must be an integer >= 1"),
    ],
)
def test_t5_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        T5BiasParams(**params)


# --------------------------------------------------------------------------------------------------
# ALiBi


def press_get_slopes(n):
    """ofirpress/attention_with_linear_biases@3b7c2ec fairseq/models/transformer.py, verbatim."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + press_get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 8, 12, 16, 20, 32, 71, 112])
def test_slopes_are_press_bloom_and_mpt(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    ours = alibi.slopes(heads)
    np.testing.assert_allclose(ours, press_get_slopes(heads), rtol=1e-14)  # float64, powers formed differently
    # BLOOM raises a float32 base to powers up to H: each slope carries up to H roundings of the base.
    np.testing.assert_allclose(ours, _get_alibi_slopes(heads, "cpu").double().numpy(), rtol=(heads + 1) * 2.0**-24)
    mpt = build_mpt_alibi_tensor(heads, 2).double().numpy()[:, 0, 0]  # slope * (0 - 1)
    np.testing.assert_allclose(ours, -mpt, rtol=2.0**-23)


def test_slopes_section_10_vectors():
    # exact: powers of two
    assert alibi.slopes(8).tolist() == [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    s12 = alibi.slopes(12)
    assert s12[:3].tolist() == [0.5, 0.25, 0.125] and s12[-1] == pytest.approx(0.08839, abs=1e-5)
    s16 = alibi.slopes(16)
    assert s16[0] == pytest.approx(0.70711, abs=1e-5) and s16[-1] == 0.00390625


def test_bloom_convention_is_build_alibi_tensor():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    H, S = 16, 300
    want = build_alibi_tensor(torch.ones(1, S, dtype=torch.long), H, torch.float32).double().numpy()  # (H, 1, S)
    spec = Spec(encoding="alibi", params=dict(heads=H, convention="bloom", max_positions=S))
    got = alibi.reference(spec, {"query_positions": np.arange(S), "key_positions": np.arange(S)})[0]  # (H, Q, K)
    lower = np.tril(np.ones((S, S), dtype=bool))
    # float32 slopes (H + 1 roundings, as above) times positions, rounded once more
    np.testing.assert_allclose(
        np.where(lower, got, 0), np.where(lower, np.broadcast_to(want, got.shape), 0), rtol=(H + 3) * 2.0**-24
    )
    assert np.all(got[:, ~lower] == -np.inf)


@pytest.mark.parametrize("bias_max", [8.0, 6.0])
def test_mpt_convention_is_build_mpt_alibi_tensor(bias_max):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    H, K, Q = 12, 200, 3  # decoding: the last Q queries over K keys, as MptAttention slices it
    want = build_mpt_alibi_tensor(H, K, bias_max).double().numpy()  # (H, 1, K)
    spec = Spec(encoding="alibi", params=dict(heads=H, convention="mpt", alibi_bias_max=bias_max, max_positions=K))
    got = alibi.reference(spec, {"query_positions": np.arange(K - Q, K), "key_positions": np.arange(K)})[0]
    visible = np.arange(K)[None, :] <= np.arange(K - Q, K)[:, None]
    np.testing.assert_allclose(got[:, visible], np.broadcast_to(want, got.shape)[:, visible], rtol=2.0**-23)


def test_alibi_properties():
    H, P = 5, 64
    q = k = np.arange(P)
    causal = alibi.reference(
        Spec(encoding="alibi", params=dict(heads=H, max_positions=P)), {"query_positions": q, "key_positions": k}
    )[0]
    bidir = alibi.reference(
        Spec(encoding="alibi", params=dict(heads=H, causal=False, max_positions=P)),
        {"query_positions": q, "key_positions": k},
    )[0]
    assert np.all(np.diagonal(causal, axis1=1, axis2=2) == 0) and np.all(np.diagonal(bidir, axis1=1, axis2=2) == 0)
    # exact: elementwise slope * distance (no BLAS), the same products both ways
    assert np.array_equal(bidir, bidir.transpose(0, 2, 1))
    lower = np.tril(np.ones((P, P), dtype=bool))
    assert np.array_equal(causal[:, lower], bidir[:, lower]) and np.all(causal[:, ~lower] == -np.inf)
    # The three causal conventions differ by one constant per (head, query row): softmax gives the same weights.
    rows = {}
    for conv in alibi.CONVENTIONS:
        b = alibi.reference(
            Spec(encoding="alibi", params=dict(heads=H, convention=conv, max_positions=P)),
            {"query_positions": q, "key_positions": k},
        )[0]
        e = np.exp(b - b.max(-1, keepdims=True))
        rows[conv] = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(rows["bloom"], rows["relative"], atol=1e-12)
    np.testing.assert_allclose(rows["mpt"], rows["relative"], atol=1e-12)


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(heads=0), "heads must be an integer >= 1"),
        (dict(heads=4, convention="falcon"), "convention must be one of relative, bloom, mpt"),
        (dict(heads=4, convention="bloom", causal=False), "the bloom convention is causal"),
        (dict(heads=4, alibi_bias_max=0.0), "alibi_bias_max must be"),
        (dict(heads=4, max_positions=2**25), r"at most 2\^24"),
    ],
)
def test_alibi_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        AlibiParams(**params)
