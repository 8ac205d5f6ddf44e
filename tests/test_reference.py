"""The float64 NumPy reference against transformers 5.23 (pinned in the test extra), the oracle it must match.

- Pairing semantics: transformers' apply functions are dtype-generic, so they run here in float64 on
  our tables; they must agree with `apply_reference` to float64 rounding.
- Tables: in `--angles float32` mode our inv_freq must equal transformers' float32 inv_freq bit for
  bit and cos/sin must be within one float32 ulp of transformers' float32 cos/sin (torch's float32
  cos/sin are not always correctly rounded; ours are, from float64).
"""

import numpy as np
import pytest
import torch

from pe_export.encodings.rope import RopeParams, apply_reference, inv_freq, tables

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_neox import modeling_gpt_neox as neox  # noqa: E402
from transformers.models.gptj import modeling_gptj as gptj  # noqa: E402
from transformers.models.llama import modeling_llama as llama  # noqa: E402

# Positions near the end of long tables as well as the start.
POSITIONS = np.array([[0, 1, 2, 1000, 8190, 8191], [5, 4095, 4096, 7000, 131070, 131071]])


def test_partial_rotary_table_matches_gpt_neox():
    config = transformers.GPTNeoXConfig(
        hidden_size=512,
        num_attention_heads=4,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    rotary = neox.GPTNeoXRotaryEmbedding(config)
    cos_hf, sin_hf = rotary(torch.zeros(1), torch.from_numpy(POSITIONS[:1]))  # (1, S, 32)
    cos, sin = tables(RopeParams(head_dim=128, rotary_dim=32, theta=10000.0, max_positions=8192, angles="float32"))
    for ours, theirs in [(cos, cos_hf), (sin, sin_hf)]:
        a = ours[POSITIONS[:1]].astype(np.float32).view(np.int32).astype(np.int64)
        b = theirs[..., :16].numpy().view(np.int32).astype(np.int64)
        assert np.abs(a - b).max() <= 1


def llama_rotary(head_dim, theta):
    config = transformers.LlamaConfig(
        head_dim=head_dim,
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    return llama.LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (128, 10000.0), (64, 10000.0), (96, 1e6)])
def test_float32_angles_match_transformers_bit_for_bit(head_dim, theta):
    rotary = llama_rotary(head_dim, theta)
    p = RopeParams(head_dim=head_dim, theta=theta, max_positions=131072, angles="float32")
    ours = inv_freq(p)[0].astype(np.float32)
    assert np.array_equal(ours.view(np.int32), rotary.inv_freq.numpy().view(np.int32))  # exact: elementwise ops

    x = torch.zeros(1, dtype=torch.float32)
    cos_hf, sin_hf = rotary(x, torch.from_numpy(POSITIONS))  # (B, S, D), float32, [c | c]
    cos, sin = tables(p)
    for ours_t, theirs in [(cos, cos_hf), (sin, sin_hf)]:
        ours32 = ours_t[POSITIONS].astype(np.float32)  # (B, S, D/2)
        theirs32 = theirs[..., : head_dim // 2].numpy()
        ulps = np.abs(ours32.view(np.int32).astype(np.int64) - theirs32.view(np.int32).astype(np.int64))
        # Same sign everywhere here (values are not tiny), so the bit distance is the ulp distance.
        assert ulps.max() <= 1, f"max {ulps.max()} ulp from transformers"


def test_float64_angles_are_exact_where_float32_angles_drift():
    """Why float64 is the default: at position 131071 the float32 angle has already moved."""
    exact = RopeParams(head_dim=128, theta=500000.0, max_positions=131072)
    f32 = RopeParams(head_dim=128, theta=500000.0, max_positions=131072, angles="float32")
    pos = np.array([131071])
    truth = np.cos(pos[:, None] * (500000.0 ** -(np.arange(0, 128, 2) / 128)))
    # float64 inv_freq carries a few ulp (2^-53 relative); the angle error is that times the position.
    assert np.abs(tables(exact)[0][pos] - truth).max() < 4 * 2.0**-53 * 131071
    assert np.abs(tables(f32)[0][pos] - truth).max() > 1e-3  # float32 angles: about 1e-2 here


def random_qk(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rotary_dim", [128, 32])
@pytest.mark.parametrize("angles", ["float64", "float32"])
def test_half_pairing_matches_llama_and_neox(rotary_dim, angles):
    p = RopeParams(head_dim=128, theta=10000.0, rotary_dim=rotary_dim, max_positions=131072, angles=angles)
    cos, sin = tables(p)
    q, k = random_qk((2, 3, POSITIONS.shape[1], 128))  # (B, H, S, D)
    c = torch.from_numpy(np.concatenate([cos, cos], -1)[POSITIONS])  # (B, S, R): transformers' [c | c]
    s = torch.from_numpy(np.concatenate([sin, sin], -1)[POSITIONS])
    apply = llama.apply_rotary_pos_emb if rotary_dim == 128 else neox.apply_rotary_pos_emb
    q_hf, k_hf = apply(q, k, c, s)
    for x, hf in [(q, q_hf), (k, k_hf)]:
        ours = apply_reference(x.numpy(), cos, sin, POSITIONS, pairing="half", rotary_dim=rotary_dim, layout="bhsd")
        np.testing.assert_allclose(ours, hf.numpy(), rtol=0, atol=1e-13)


def test_interleaved_pairing_matches_gptj():
    p = RopeParams(
        head_dim=256, rotary_dim=64, theta=10000.0, pairing="interleaved", max_positions=2048, angles="float32"
    )
    cos, sin = tables(p)
    # GPT-J's own table: [sin | cos] from float32 angles, computed by transformers.
    sincos = gptj.create_sinusoidal_positions(2048, 64).numpy()
    ulps = np.abs(
        np.concatenate([sin, cos], -1).astype(np.float32).view(np.int32).astype(np.int64) - sincos.view(np.int32)
    )
    assert ulps.max() <= 1

    positions = np.array([[0, 1, 700, 2046, 2047]])
    x, _ = random_qk((1, positions.shape[1], 5, 256))  # GPT-J works on (B, S, H, D)
    rot = x[..., :64]
    s = torch.from_numpy(sin[positions])  # (B, S, R/2)
    c = torch.from_numpy(cos[positions])
    hf = torch.cat([gptj.apply_rotary_pos_emb(rot, s, c), x[..., 64:]], dim=-1)
    ours = apply_reference(x.numpy(), cos, sin, positions, pairing="interleaved", rotary_dim=64, layout="bshd")
    np.testing.assert_allclose(ours, hf.numpy(), rtol=0, atol=1e-13)


def test_default_rule_hand_values():
    """theta^(-2m/R) written out by hand for R = 4: [1, 1/100] at theta 10000."""
    freqs, factor = inv_freq(RopeParams(head_dim=4, theta=10000.0))
    np.testing.assert_allclose(freqs, [1.0, 0.01], rtol=1e-15)
    assert factor == 1.0
    cos, sin = tables(RopeParams(head_dim=4, theta=10000.0, max_positions=3))
    np.testing.assert_allclose(cos[2], [np.cos(2.0), np.cos(0.02)], rtol=1e-15)
    np.testing.assert_allclose(sin[2], [np.sin(2.0), np.sin(0.02)], rtol=1e-15)
