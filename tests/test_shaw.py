"""Shaw relative position representations: the exported attention layer on ONNX Runtime CPU and onnx's
ReferenceEvaluator against the float64 reference, and the reference and the torch module against a
direct transcription of tensor2tensor's code, with the same weights.

tensor2tensor is TensorFlow; its four functions are transcribed below line by line into torch float64
(tensorflow/tensor2tensor@5623deb tensor2tensor/layers/common_attention.py: `_generate_relative_positions_matrix`
L1670, `_generate_relative_positions_embeddings` L1691, `_relative_attention_inner` L1705,
`dot_product_attention_relative` L1739; t2t's `multihead_attention` scales q by depth**-0.5 before the call).
t2t's positions are 0..L-1: self-attention (Q = K), memory (`allow_memory`: the queries are the last Q of the
K keys) and `cache=True` (one query, at K - 1).
"""

import dataclasses
import re

import numpy as np
import pytest
from conftest import assert_verified, exported, ort_cpu_session

from pe_export.dtypes import numpy_dtype
from pe_export.encodings import ENCODINGS
from pe_export.encodings.shaw import ShawParams, tables
from pe_export.spec import Spec
from pe_export.verification.tolerances import bound

torch = pytest.importorskip("torch")

SMALL = dict(heads=2, head_dim=16, max_relative_position=4, max_positions=64)
REAL = dict(heads=8, head_dim=64, max_relative_position=16, max_positions=512)


def shaw_spec(dtype="fp32", **params) -> Spec:
    return Spec(encoding="shaw", params={**SMALL, **params}, op="decomposed", opset=17, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# tensor2tensor, transcribed (tf.range -> torch.arange, tf.clip_by_value -> torch.clamp, tf.gather -> indexing)


def t2t_generate_relative_positions_matrix(length_q, length_k, max_relative_position, cache=False):
    if not cache:
        if length_q == length_k:
            range_vec_q = range_vec_k = torch.arange(length_q)
        else:
            range_vec_k = torch.arange(length_k)
            range_vec_q = range_vec_k[-length_q:]
        distance_mat = range_vec_k[None, :] - range_vec_q[:, None]
    else:
        distance_mat = torch.arange(-length_k + 1, 1, 1)[None, :]
    distance_mat_clipped = torch.clamp(distance_mat, -max_relative_position, max_relative_position)
    return distance_mat_clipped + max_relative_position


def t2t_generate_relative_positions_embeddings(
    length_q, length_k, embeddings_table, max_relative_position, cache=False
):
    relative_positions_matrix = t2t_generate_relative_positions_matrix(
        length_q, length_k, max_relative_position, cache=cache
    )
    assert embeddings_table.shape[0] == max_relative_position * 2 + 1  # vocab_size
    return embeddings_table[relative_positions_matrix]


def t2t_relative_attention_inner(x, y, z, transpose):
    batch_size, heads, length = x.shape[0], x.shape[1], x.shape[2]
    xy_matmul = x @ (y.transpose(-1, -2) if transpose else y)
    x_t = x.permute(2, 0, 1, 3)
    x_t_r = x_t.reshape(length, heads * batch_size, -1)
    x_tz_matmul = x_t_r @ (z.transpose(-1, -2) if transpose else z)
    x_tz_matmul_r = x_tz_matmul.reshape(length, batch_size, heads, -1)
    x_tz_matmul_r_t = x_tz_matmul_r.permute(1, 2, 0, 3)
    return xy_matmul + x_tz_matmul_r_t


def t2t_dot_product_attention_relative(
    q, k, v, bias, max_relative_position, keys_table, values_table, cache=False, allow_memory=False
):
    # the t2t variables `relative_positions_keys/embeddings` and `relative_positions_values/embeddings` are arguments
    if not max_relative_position:
        raise ValueError(
            f"Max relative position ({max_relative_position}) should be > 0 when using relative self attention."
        )
    length_k = k.shape[2]
    length_q = q.shape[2] if allow_memory else length_k
    relations_keys = t2t_generate_relative_positions_embeddings(
        length_q, length_k, keys_table, max_relative_position, cache
    )
    relations_values = t2t_generate_relative_positions_embeddings(
        length_q, length_k, values_table, max_relative_position, cache
    )
    logits = t2t_relative_attention_inner(q, k, relations_keys, True)
    if bias is not None:
        logits += bias
    weights = torch.softmax(logits, dim=-1)
    return t2t_relative_attention_inner(weights, v, relations_values, False)


def t2t_ones_matrix_band_part(rows, cols, num_lower, num_upper):
    """t2t's `ones_matrix_band_part` (its NumPy branch for int arguments)."""
    if num_lower < 0:
        num_lower = rows - 1
    if num_upper < 0:
        num_upper = cols - 1
    lower_mask = np.tri(cols, rows, num_lower).T
    upper_mask = np.tri(rows, cols, num_upper)
    return np.ones((rows, cols)) * lower_mask * upper_mask


def t2t_causal_bias(length_q, length_k):
    """-1e9 on keys after their query: `attention_bias_lower_triangle` (Q = K, `attention_bias_local(L, -1, 0)`),
    with the K - Q memory columns in front visible to every query (as t2t's memory bias lays them out)."""
    band = t2t_ones_matrix_band_part(length_q, length_k, -1, length_k - length_q)
    return torch.from_numpy(-1e9 * (1.0 - band))[None, None]


def t2t_layer(p: ShawParams, q, k, v, mode):
    """t2t's output for float64 q (B, H, Q, D), k and v (B, H, K, D); q scaled as multihead_attention does."""
    keys_table, values_table = (torch.from_numpy(t) for t in tables(p))
    q = torch.from_numpy(q) * p.head_dim**-0.5
    k, v = torch.from_numpy(k), torch.from_numpy(v)
    bias = t2t_causal_bias(q.shape[2], k.shape[2]) if p.causal else None  # cache: Q = 1 sees every key
    out = t2t_dot_product_attention_relative(
        q,
        k,
        v,
        bias,
        p.max_relative_position,
        keys_table,
        values_table,
        cache=mode == "cache",
        allow_memory=mode == "memory",
    )
    return out.numpy()


# (mode, Q, K, offset): t2t's positions 0..K-1; ours the same shifted by `offset`.
T2T_CASES = [(mode, Q, 40, offset) for mode, Q in (("self", 40), ("memory", 8), ("cache", 1)) for offset in (0, 24)]


def t2t_inputs(spec, Q, K, offset, seed=0):
    """Inputs in the spec's dtype (so that t2t's float64 sees exactly what the graph sees); positions are
    the last Q of K consecutive key positions starting at `offset`, as t2t lays them out."""
    p = ShawParams(**spec.params)
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(spec.dtype)
    x = {
        n: rng.standard_normal((2, p.heads, L, p.head_dim)).astype(dtype)
        for n, L in (("query", Q), ("key", K), ("value", K))
    }
    keys = np.arange(offset, offset + K, dtype=np.int64)
    return x | {"query_positions": keys[K - Q :].copy(), "key_positions": keys}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode,Q,K,offset", T2T_CASES)
def test_reference_matches_tensor2tensor(mode, Q, K, offset, causal):
    spec = shaw_spec(causal=causal)
    p = ShawParams(**spec.params)
    inputs = t2t_inputs(spec, Q, K, offset)
    want = t2t_layer(p, *(inputs[n].astype(np.float64) for n in ("query", "key", "value")), mode)
    got = ENCODINGS.get("shaw").reference(spec, inputs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode,Q,K,offset", T2T_CASES[1::2])
def test_torch_and_onnx_match_tensor2tensor(mode, Q, K, offset, causal, dtype):
    """The torch module and the exported graph (ORT CPU), in fp32 and fp16, against t2t in float64, within
    the rounding bound of that dtype; and the graph runs with Q != K (memory, cache)."""
    spec = shaw_spec(dtype, causal=causal)
    p = ShawParams(**spec.params)
    inputs = t2t_inputs(spec, Q, K, offset)
    want = t2t_layer(p, *(inputs[n].astype(np.float64) for n in ("query", "key", "value")), mode)
    limit = bound(spec, inputs)
    with torch.no_grad():
        eager = ENCODINGS.get("shaw").module(spec)(*(torch.from_numpy(a) for a in inputs.values())).double().numpy()
    graph = ort_cpu_session(exported(spec)).run(None, inputs)[0].astype(np.float64)
    for name, got in (("torch", eager), ("ort-cpu", graph)):
        err = np.abs(got - want)
        assert np.all(err <= limit), (
            f"{name}: max abs error {err.max():.3g}, worst error/bound {np.max(err / limit):.3g}"
        )


# ------------------------------------------------------------------------------------------------
# Parity of the exported graph (verify.check: probes prefill, decode Q=1, cached Q != K, start; keys end at the
# last row of the table)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_parity(dtype, causal):
    rows = assert_verified(shaw_spec(dtype, causal=causal))
    assert {"decode", "cached"} <= set(rows["torch"].probes)


def test_parity_real_size_causal_fp16():
    """heads 8, head_dim 64, k 16, a table of 512 positions (the preset), causal; the preset itself is
    in test_encodings."""
    assert_verified(Spec(encoding="shaw", params={**REAL, "causal": True}, op="decomposed", opset=17, dtype="fp16"))


# ------------------------------------------------------------------------------------------------
# Properties


def test_shifting_every_position_changes_nothing():
    """Only j - i enters: the graph's output is bit-for-bit the same at positions shifted by any amount."""
    spec = shaw_spec()
    sess = ort_cpu_session(exported(spec))
    inputs = t2t_inputs(spec, 8, 24, 0)
    base = sess.run(None, inputs)[0]
    for shift in (1, 17, 64 - 24):
        moved = inputs | {n: inputs[n] + shift for n in ("query_positions", "key_positions")}
        # exact: the same graph on the same shapes and values (the rows r do not move), so the same kernels
        np.testing.assert_array_equal(sess.run(None, moved)[0], base)


def test_clipping():
    """Keys farther than k on the same side all read the same table row: their order no longer matters.
    Keys within k read different rows: their order does."""
    spec = shaw_spec(max_relative_position=4)
    ref = ENCODINGS.get("shaw").reference
    inputs = t2t_inputs(spec, 1, 12, 0) | {"query_positions": np.array([40], dtype=np.int64)}  # every key > 4 away
    perm = np.random.default_rng(1).permutation(12)
    swapped = inputs | {n: inputs[n][:, :, perm] for n in ("key", "value")}
    np.testing.assert_allclose(ref(spec, swapped), ref(spec, inputs), rtol=0, atol=1e-12)
    near = inputs | {"query_positions": np.array([11], dtype=np.int64)}  # keys 7..11 within 4
    assert np.abs(ref(spec, near | {k: swapped[k] for k in ("key", "value")}) - ref(spec, near)).max() > 1e-3


def test_output_depends_on_k():
    inputs = t2t_inputs(shaw_spec(), 8, 24, 10)
    out = {k: ort_cpu_session(exported(shaw_spec(max_relative_position=k))).run(None, inputs)[0] for k in (4, 5)}
    assert np.abs(out[4] - out[5]).max() > 1e-2


def test_causal_masks_later_keys():
    """Causal: a key after its query gets weight 0, so changing its value changes nothing before it."""
    spec = shaw_spec(causal=True)
    ref = ENCODINGS.get("shaw").reference
    inputs = t2t_inputs(spec, 16, 16, 30)
    changed = dict(inputs)
    changed["value"] = inputs["value"].copy()
    changed["value"][:, :, -1] += 5.0
    a, b = ref(spec, inputs), ref(spec, changed)
    # exact: the same shapes (so the same BLAS kernels and orders), and the changed key's weight is exactly 0
    np.testing.assert_array_equal(a[:, :, :-1], b[:, :, :-1])
    assert np.abs(a[:, :, -1] - b[:, :, -1]).min() > 0


# ------------------------------------------------------------------------------------------------
# Out-of-range positions and bad parameters

OUT_OF_RANGE = [([64], [0, 63]), ([-1], [0, 1]), ([3], [0, 64]), ([3], [-1, 2]), ([70], [-65, 2])]


@pytest.mark.parametrize("qp,kp", OUT_OF_RANGE, ids=str)
def test_out_of_range_positions_fail(qp, kp):
    from onnx.reference import ReferenceEvaluator

    spec = shaw_spec()
    inputs = t2t_inputs(spec, len(qp), len(kp), 0) | {
        "query_positions": np.array(qp, dtype=np.int64),
        "key_positions": np.array(kp, dtype=np.int64),
    }
    with pytest.raises(IndexError, match="position out of range"):
        ENCODINGS.get("shaw").reference(spec, inputs)
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(exported(spec), opts, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="out of data bounds"):
        sess.run(None, inputs)
    import onnx

    with pytest.raises(IndexError):
        ReferenceEvaluator(onnx.load_from_string(exported(spec))).run(None, inputs)


def test_last_row_is_in_range():
    spec = shaw_spec()
    inputs = t2t_inputs(spec, 1, 64, 0)  # query 63, keys 0..63
    out = ort_cpu_session(exported(spec)).run(None, inputs)[0]
    np.testing.assert_allclose(out, ENCODINGS.get("shaw").reference(spec, inputs), rtol=0, atol=1e-5)


BAD = [
    (dict(heads=0), "heads must be an integer >= 1, got 0"),
    (dict(head_dim=-4), "head_dim must be an integer >= 1, got -4"),
    (dict(head_dim=8.0), "head_dim must be an integer >= 1, got 8.0"),
    (dict(max_relative_position=0), "max_relative_position must be an integer >= 1, got 0"),
    (dict(max_relative_position=True), "max_relative_position must be an integer >= 1, got True"),
    (dict(max_positions=0), "max_positions must be an integer >= 1, got 0"),
    (dict(causal="yes"), "causal must be true or false, got 'yes'"),
    (dict(weights_seed=-1), "weights_seed must be an integer >= 0"),
    (dict(weights="w.safetensors", key="t"), "seeded random weights only"),
]


@pytest.mark.parametrize("params,message", BAD, ids=[m for _, m in BAD])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShawParams(**{**SMALL, **params})


def test_defaults():
    p = ShawParams(heads=8, head_dim=64)
    assert (p.max_relative_position, p.max_positions, p.causal) == (16, 512, False)
    a_k, a_v = tables(dataclasses.replace(p, max_relative_position=3))
    assert a_k.shape == a_v.shape == (7, 64) and not np.array_equal(a_k, a_v)
