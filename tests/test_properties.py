"""Properties the RoPE math guarantees, checked on the float64 reference."""

import numpy as np
import pytest

from pe_export.encodings.rope import RopeParams, apply_reference, tables

rng = np.random.default_rng(7)


def rotate(x, positions, **params):
    p = RopeParams(max_positions=70000, **params)
    cos, sin = tables(p)
    return apply_reference(x, cos, sin, positions, pairing=p.pairing, rotary_dim=p.rotary_dim, layout="bhsd")


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rotation_preserves_each_pair_norm(pairing):
    x = rng.standard_normal((2, 3, 4, 64))
    pos = np.array([[0, 9, 1000, 69999], [1, 2, 3, 50000]])
    y = rotate(x, pos, head_dim=64, rotary_dim=48, pairing=pairing)
    if pairing == "half":
        pairs = lambda t: (t[..., :24], t[..., 24:48])  # noqa: E731
    else:
        pairs = lambda t: (t[..., 0:48:2], t[..., 1:48:2])  # noqa: E731
    (xa, xb), (ya, yb) = pairs(x), pairs(y)
    np.testing.assert_allclose(ya**2 + yb**2, xa**2 + xb**2, rtol=1e-12)
    np.testing.assert_array_equal(y[..., 48:], x[..., 48:])  # the pass-through tail is untouched (copied: exact)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_score_depends_only_on_distance(pairing):
    q = rng.standard_normal((1, 1, 1, 32))
    k = rng.standard_normal((1, 1, 1, 32))

    def score(m, n):
        qm = rotate(q, np.array([[m]]), head_dim=32, pairing=pairing)
        kn = rotate(k, np.array([[n]]), head_dim=32, pairing=pairing)
        return float((qm * kn).sum())

    for m, n, shift in [(5, 2, 1000), (0, 0, 65000), (17, 40, 31)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)  # and it does depend on the distance


def test_half_and_interleaved_equal_up_to_the_pair_permutation():
    """interleaved(x) = P^-1 half(P x), P taking dims (2i, 2i+1) to (i, i + R/2)."""
    R = 16
    perm = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2), np.arange(R, 24)])  # P x = x[..., perm]
    x = rng.standard_normal((2, 3, 5, 24))
    pos = rng.integers(0, 70000, (2, 5))
    inter = rotate(x, pos, head_dim=24, rotary_dim=R, pairing="interleaved")
    half = rotate(x[..., perm], pos, head_dim=24, rotary_dim=R, pairing="half")
    np.testing.assert_allclose(half[..., np.argsort(perm)], inter, rtol=0, atol=1e-12)
    assert np.abs(inter - rotate(x, pos, head_dim=24, rotary_dim=R, pairing="half")).max() > 0.1


def test_position_zero_is_identity():
    x = rng.standard_normal((1, 2, 3, 16))
    np.testing.assert_allclose(
        rotate(x, np.zeros((1, 3), dtype=np.int64), head_dim=16), x, rtol=0, atol=0
    )  # exact: cos 1, sin 0
