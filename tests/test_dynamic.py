"""Dynamic NTK computed in the graph, against transformers 5.23's dynamic rotary embedding: the same
file, fed positions whose largest is below, at and past L = max_position_embeddings."""

import numpy as np
import pytest
import torch
from conftest import exported, ort_cpu_session

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.spec import Spec

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama as llama  # noqa: E402

L, P, D, FACTOR = 256, 2048, 64, 4.0


def spec(op, mode="runtime", layout="bhsd"):
    params = dict(
        head_dim=D,
        max_positions=P,
        scaling="dynamic",
        scaling_params=dict(factor=FACTOR, original_max_positions=L, mode=mode),
    )
    return Spec(encoding="rope", params=params, op=op, opset=OP_TARGETS[op].min_opset, layout=layout)


def transformers_rope(x, ids):
    """A fresh module per call: transformers' dynamic update then uses max(ids) + 1, as the graph does."""
    config = transformers.LlamaConfig(
        head_dim=D,
        hidden_size=D * 4,
        num_attention_heads=4,
        max_position_embeddings=L,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": FACTOR},
    )
    cos, sin = llama.LlamaRotaryEmbedding(config)(torch.from_numpy(x), torch.from_numpy(ids))
    return llama.apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)[0].numpy()


@pytest.mark.parametrize("op", OP_TARGETS)
@pytest.mark.parametrize("largest", [40, L - 1, L, 3 * L, P - 1])
def test_runtime_mode_matches_transformers(op, largest):
    sess = ort_cpu_session(exported(spec(op)))
    rng = np.random.default_rng(largest)
    ids = np.sort(rng.choice(largest + 1, size=min(24, largest + 1), replace=False))
    ids[-1] = largest
    ids = np.stack([ids, ids[::-1]])
    x = rng.standard_normal((2, 3, ids.shape[1], D), dtype=np.float32)
    got = sess.run(None, {"x": x, "position_ids": ids})[0].astype(np.float64)
    want = transformers_rope(x, ids).astype(np.float64)
    # transformers forms its angles in float32: each is off by up to about position * inv_freq * 2^-23
    # (inv_freq <= 1) on top of the float32 rounding both sides share.
    half = np.abs(x[..., : D // 2]) + np.abs(x[..., D // 2 :])
    scale = np.concatenate([half, half], -1)
    pos = ids[:, None, :, None].astype(np.float64)
    bound = scale * (4 * 2.0**-23 + 2 * pos * 2.0**-23)
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))
    if largest > L:  # the base really changed, so a graph that ignored the positions would fail above
        unscaled = transformers.LlamaConfig(
            head_dim=D, hidden_size=D * 4, num_attention_heads=4, max_position_embeddings=P
        )
        cos, sin = llama.LlamaRotaryEmbedding(unscaled)(torch.from_numpy(x), torch.from_numpy(ids))
        plain = llama.apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)[0].numpy()
        assert np.abs(plain - got).max() > 1e-2


@pytest.mark.parametrize("op", OP_TARGETS)
def test_runtime_graph_has_no_table(op):
    import onnx

    model = onnx.load_from_string(exported(spec(op)))
    assert sum(np.prod(t.dims) for t in model.graph.initializer) < 1000
    assert len(exported(spec(op))) < 20_000


def test_fixed_mode_is_one_table_for_the_whole_length():
    """vLLM's semantics: the base of seq_len = P for every call, short ones included."""
    from pe_export.verification.parity import check, verdict

    s = spec("onnx", mode="fixed")
    assert verdict(check(s, exported(s), runtimes=("ort-cpu",))) == "pass"
    sess = ort_cpu_session(exported(s))
    ids = np.array([[0, 5, 40]])
    x = np.random.default_rng(0).standard_normal((1, 1, 3, D), dtype=np.float32)
    got = sess.run(None, {"x": x, "position_ids": ids})[0]
    long_ids = np.array([[0, 5, 40, P - 1]])  # transformers at seq_len = P: the same base
    want = transformers_rope(np.concatenate([x, x[:, :, :1]], 2), long_ids)[:, :, :3]
    assert np.abs(got - want).max() < 1e-5


def test_float32_angles_are_refused_for_a_graph_that_computes_them():
    from pe_export.encodings.rope import RopeParams

    with pytest.raises(ValueError, match="angles 'float32' cannot be reproduced by a graph"):
        RopeParams(
            head_dim=D, angles="float32", scaling="dynamic", scaling_params=dict(factor=2.0, original_max_positions=L)
        )


def test_openvino_runs_the_in_graph_float64_angles_in_float32_and_fails():
    """OpenVINO's CPU plugin has no float64 kernels: the runtime-mode graph's angles lose float64
    there, which verify must report as a failure (and say why), while the fixed-mode table passes."""
    pytest.importorskip("openvino")
    from pe_export.runtimes.graphs import computes_in_float64
    from pe_export.verification.parity import check

    data = exported(spec("decomposed"))
    assert computes_in_float64(data) and not computes_in_float64(exported(spec("decomposed", mode="fixed")))
    (row,) = check(spec("decomposed"), data, ("openvino",))
    assert row.verdict == "FAIL" and row.worst_ratio > 10 and "float64 math run in float32" in row.provider, row
    (row,) = check(spec("decomposed", mode="fixed"), exported(spec("decomposed", mode="fixed")), ("openvino",))
    assert row.verdict == "pass", row
