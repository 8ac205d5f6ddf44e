"""The magnitudes that scale error bounds: of a table read, and of one softmax attention layer."""

from __future__ import annotations

import numpy as np


def table_magnitude(reference):
    """The magnitude of a bias read from a table rounded once: |bias|, and 0 for a mask's -inf, which
    is exact."""

    def magnitude(spec, inputs):
        b = np.abs(reference(spec, inputs))
        return np.where(np.isfinite(b), b, 0.0)

    return magnitude


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64; -inf entries get weight 0."""
    m = np.max(logits, axis=-1, keepdims=True)
    e = np.exp(logits - m)
    return e / e.sum(axis=-1, keepdims=True)


def attention_magnitude(alpha: np.ndarray, value_abs: np.ndarray, logit_abs: np.ndarray, terms: int) -> np.ndarray:
    """Per output element, the magnitude its rounding error is bounded by (times eps): each logit, a sum
    of `terms` rounded products, is off by at most terms * eps * logit_abs (the sum of the absolute
    values of its products); softmax turns a logit error e into a relative weight error of at most 2e;
    the weighted sum over K values adds K + 2 roundings. So
        sum_j alpha_ij |v_jd| * (2 * terms * max_j logit_abs_ij + K + 4).
    alpha and logit_abs (B, H, Q, K); value_abs (B, H, K, D) or (B, H, Q, K, D)."""
    spread = 2 * terms * np.max(np.where(alpha > 0, logit_abs, 0.0), axis=-1, keepdims=True) + alpha.shape[-1] + 4
    if value_abs.ndim == 4:
        weighted = np.einsum("bhqk,bhkd->bhqd", alpha, value_abs)
    else:
        weighted = np.einsum("bhqk,bhqkd->bhqd", alpha, value_abs)
    return weighted * spread
