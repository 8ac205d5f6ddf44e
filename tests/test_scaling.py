"""RoPE scaling rules against transformers 5.23's `ROPE_INIT_FUNCTIONS`, and against the hand-computed
values of `shared/reference/encodings.md` section 10 (derived there independently of both codes)."""

import math

import numpy as np
import pytest
import torch

from pe_export.encodings.rope import RopeParams, inv_freq
from pe_export.scaling import SCALING_RULES
from pe_export.scaling.yarn import softmax_scale_factor

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# Our parameter names -> transformers' rope_parameters keys.
HF_KEYS = {"original_max_positions": "original_max_position_embeddings"}

# (rule, head_dim, rotary_dim, theta, scaling params): a grid per rule, the presets' values among them.
GRID = [
    ("linear", 128, 128, 10000.0, dict(factor=1.0)),
    ("linear", 128, 128, 10000.0, dict(factor=2.0)),
    ("linear", 96, 48, 1e6, dict(factor=8.0)),
    (
        "llama3",
        128,
        128,
        500000.0,
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192),
    ),
    (
        "llama3",
        64,
        64,
        500000.0,
        dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192),
    ),
    (
        "llama3",
        128,
        64,
        10000.0,
        dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_positions=2048),
    ),
    ("yarn", 128, 128, 1e6, dict(factor=4.0, original_max_positions=32768)),
    (
        "yarn",
        64,
        64,
        10000.0,
        dict(factor=40.0, original_max_positions=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    ),
    ("yarn", 128, 128, 10000.0, dict(factor=2.0, original_max_positions=4096, truncate=False)),
    ("yarn", 128, 96, 10000.0, dict(factor=16.0, original_max_positions=2048, beta_fast=16.0, beta_slow=2.0)),
    ("yarn", 128, 128, 10000.0, dict(factor=8.0, original_max_positions=4096, attention_factor=1.5)),
    ("yarn", 64, 64, 10000.0, dict(factor=40.0, original_max_positions=4096, mscale=0.707, mscale_all_dim=0.707)),
    # LongRoPE with made-up factor lists (Phi-3's lists are not shipped here); checked in both regimes below.
    (
        "longrope",
        96,
        96,
        10000.0,
        dict(
            short_factor=[1 + i / 100 for i in range(48)],
            long_factor=[1 + i / 5 for i in range(48)],
            original_max_positions=4096,
            factor=32.0,
        ),
    ),
    (
        "longrope",
        64,
        32,
        10000.0,
        dict(
            short_factor=[1.0] * 16,
            long_factor=[2.0 + i for i in range(16)],
            original_max_positions=2048,
            factor=4.0,
            attention_factor=1.25,
        ),
    ),
    ("proportional", 256, 256, 1e6, dict(partial_rotary_factor=0.25)),
    ("proportional", 128, 128, 10000.0, dict(partial_rotary_factor=1.0, factor=8.0)),
    ("proportional", 96, 96, 10000.0, dict(partial_rotary_factor=0.5, factor=2.0)),
    ("dynamic", 128, 128, 10000.0, dict(factor=2.0, original_max_positions=4096)),
    ("dynamic", 96, 64, 500000.0, dict(factor=8.0, original_max_positions=2048)),
]

# Rules that read seq_len: the values of it to check besides None (both regimes, and deep into the scaled one).
LONG_SEQ = {
    "longrope": lambda params: [params["original_max_positions"] + 1],
    "dynamic": lambda params: [
        params["original_max_positions"],
        params["original_max_positions"] + 1,
        5 * params["original_max_positions"],
    ],
}


def hf_rule(rule, head_dim, rotary_dim, theta, params, seq_len=None):
    rope = {"rope_type": rule, "rope_theta": theta, "partial_rotary_factor": rotary_dim / head_dim}
    rope.update({HF_KEYS.get(k, k): v for k, v in params.items()})  # proportional's own factor overrides
    max_pos = 131072
    if rule == "dynamic":  # transformers' dynamic NTK scales from max_position_embeddings
        max_pos = rope.pop("original_max_position_embeddings")
        seq_len = None if seq_len is None else torch.tensor(seq_len)
    config = transformers.LlamaConfig(
        head_dim=head_dim,
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
    )
    freqs, factor = ROPE_INIT_FUNCTIONS[rule](config, "cpu", seq_len=seq_len)
    return freqs.numpy(), factor


@pytest.mark.parametrize("rule,head_dim,rotary_dim,theta,params", GRID, ids=[f"{g[0]}-{i}" for i, g in enumerate(GRID)])
def test_rules_match_transformers(rule, head_dim, rotary_dim, theta, params):
    seq_lens = [None] + (LONG_SEQ[rule](params) if rule in LONG_SEQ else [])
    for seq_len in seq_lens:  # both regimes of a switching rule
        hf_freqs, hf_factor = hf_rule(rule, head_dim, rotary_dim, theta, params, seq_len)
        common = dict(head_dim=head_dim, rotary_dim=rotary_dim, theta=theta, scaling=rule, scaling_params=params)
        exact, factor = inv_freq(RopeParams(**common), seq_len)
        # The rule itself in float32 (what --angles float32 uses; RopeParams refuses it for in-graph rules).
        f32, factor32 = SCALING_RULES.get(rule)(
            theta=theta, rotary_dim=rotary_dim, max_positions=8192, dtype=torch.float32, seq_len=seq_len, **params
        )
        f32 = f32.numpy()
        # float32 mode: transformers' own float32 arithmetic, bit for bit (elementwise, no BLAS).
        np.testing.assert_array_equal(f32.astype(np.float32), hf_freqs)
        # float64 mode: the exact values, which transformers' float32 values round.
        np.testing.assert_allclose(exact, hf_freqs, rtol=8 * 2.0**-24, atol=0)
        assert factor == pytest.approx(hf_factor, rel=1e-15) and factor32 == factor


def test_every_rule_is_in_the_grid_or_the_unscaled_default():
    tested = {g[0] for g in GRID} | {"default", "ntk"}  # ntk: transformers dropped it; see the hand values below
    assert set(SCALING_RULES.names()) <= tested


@pytest.mark.parametrize("rule", [r for r in SCALING_RULES.names() if r != "default"])
def test_factor_one_is_the_unscaled_rule_where_it_should_be(rule):
    params = dict(
        linear=dict(factor=1.0),
        ntk=dict(factor=1.0),
        llama3=dict(factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192),
        yarn=dict(factor=1.0, original_max_positions=4096),
        longrope=dict(factor=1.0, original_max_positions=4096, short_factor=[1.0] * 32, long_factor=[1.0] * 32),
        dynamic=dict(factor=1.0, original_max_positions=4096),
        proportional=dict(factor=1.0),
    )[rule]
    scaled, factor = inv_freq(RopeParams(head_dim=64, scaling=rule, scaling_params=params))
    plain, _ = inv_freq(RopeParams(head_dim=64))
    np.testing.assert_allclose(scaled, plain, rtol=1e-15)
    assert factor == 1.0


# ---- section 10's hand-computed values ----


def test_yarn_correction_range_and_attention_factors():
    def ramp_edges(rotary_dim):
        freqs, _ = inv_freq(
            RopeParams(
                head_dim=rotary_dim, scaling="yarn", scaling_params=dict(factor=8.0, original_max_positions=4096)
            )
        )
        base = inv_freq(RopeParams(head_dim=rotary_dim))[0]
        ratio = freqs / base  # 1 where kept (extrapolation), 1/8 where interpolated
        kept = np.flatnonzero(np.isclose(ratio, 1.0, rtol=1e-12))
        scaled = np.flatnonzero(np.isclose(ratio, 1 / 8, rtol=1e-12))
        return kept.max() + 1, scaled.min()

    # d=128: low 20.944 -> 20, high 45.027 -> 46; d=64: 10.47 -> 10, 22.51 -> 23 (pairs index m).
    assert ramp_edges(128) == (21, 46)
    assert ramp_edges(64) == (11, 23)
    for f, want in [(2, 1.069315), (4, 1.138629), (8, 1.207944), (16, 1.277259), (40, 1.368888)]:
        _, factor = inv_freq(
            RopeParams(head_dim=64, scaling="yarn", scaling_params=dict(factor=float(f), original_max_positions=4096))
        )
        assert factor == pytest.approx(want, abs=1e-6)


def test_deepseek_v3_yarn_factors():
    params = dict(factor=40.0, original_max_positions=4096, mscale=1.0, mscale_all_dim=1.0)
    _, factor = inv_freq(RopeParams(head_dim=64, pairing="interleaved", scaling="yarn", scaling_params=params))
    assert factor == 1.0  # mscale / mscale_all_dim cancel on cos and sin
    assert (
        softmax_scale_factor(**params)
        == pytest.approx((0.1 * math.log(40) + 1) ** 2)
        == pytest.approx(1.8739, abs=1e-4)
    )


def test_llama31_bands():
    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)
    scaled, _ = inv_freq(RopeParams(head_dim=128, theta=500000.0, scaling="llama3", scaling_params=params))
    ratio = scaled / inv_freq(RopeParams(head_dim=128, theta=500000.0))[0]
    kept = np.isclose(ratio, 1.0, rtol=1e-12).sum()
    divided = np.isclose(ratio, 1 / 8, rtol=1e-12).sum()
    assert (kept, divided, 64 - kept - divided) == (29, 29, 6)


def test_longrope_attention_factor_for_phi3_mini_128k():
    """sqrt(1 + ln 32 / ln 4096) = 1.1902381 for factor 131072 / 4096 (section 10)."""
    params = dict(factor=32.0, original_max_positions=4096, short_factor=[1.0] * 48, long_factor=[1.0] * 48)
    assert inv_freq(RopeParams(head_dim=96, scaling="longrope", scaling_params=params))[1] == pytest.approx(
        1.1902381, abs=1e-7
    )


def test_dynamic_ntk_base_hand_values():
    """base 1e4, d=128, L=4096, factor 2: base 10000 at seq <= L, 30527.74 at seq = 8192 (section 10),
    which is also vLLM's static base for a table of 2L (mode "fixed")."""
    params = dict(factor=2.0, original_max_positions=4096)
    base = lambda freqs: (1 / freqs[1]) ** (128 / 2)  # noqa: E731  inv_freq[1] = base^(-2/128)
    assert base(inv_freq(RopeParams(head_dim=128, scaling="dynamic", scaling_params=params), 4096)[0]) == pytest.approx(
        10000.0
    )
    assert base(inv_freq(RopeParams(head_dim=128, scaling="dynamic", scaling_params=params), 8192)[0]) == pytest.approx(
        30527.74, abs=0.01
    )
    fixed = RopeParams(head_dim=128, max_positions=8192, scaling="dynamic", scaling_params={**params, "mode": "fixed"})
    assert base(inv_freq(fixed)[0]) == pytest.approx(30527.74, abs=0.01)


def test_static_ntk_is_the_transformers_formula_not_vllms():
    """HF-early ntk vs vLLM ntk, d=128, theta 1e4, factor 4: inv_freq ratio 1.02190 at m=0, 1.01072 at
    m=32, 1.00000 at m=63 (section 10)."""
    ours, _ = inv_freq(RopeParams(head_dim=128, scaling="ntk", scaling_params=dict(factor=4.0)))
    m = np.arange(64)
    vllm = 10000.0 ** (-2 * m / 128) * 4.0 ** (-2 * (m + 1) / 128)
    ratio = ours / vllm
    assert ratio[[0, 32, 63]] == pytest.approx([1.02190, 1.01072, 1.00000], abs=1e-5)


@pytest.mark.parametrize(
    "rule,params,message",
    [
        ("linear", dict(factor=0.5), "factor must be >= 1, got 0.5"),
        (
            "yarn",
            dict(factor=4.0, original_max_positions=4096, beta_fast=1.0, beta_slow=32.0),
            "beta_fast must be > beta_slow (32.0), got 1.0",
        ),
        (
            "llama3",
            dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0, original_max_positions=8192),
            "high_freq_factor must be > low_freq_factor (4.0), got 1.0",
        ),
        ("yarn", dict(factor=4.0), "needs 'original_max_positions'"),
        ("linear", dict(factor=2.0, beta=1), "has no parameter 'beta'; it takes: factor"),
        (
            "nope",
            dict(),
            "unknown scaling rule 'nope'; known: default, dynamic, linear, llama3, longrope, ntk, proportional, yarn",
        ),
    ],
)
def test_rule_validation(rule, params, message):
    with pytest.raises(ValueError) as e:
        RopeParams(head_dim=64, scaling=rule, scaling_params=params)
    assert message in str(e.value)
