"""LongRoPE's run-time switch in the exported graph, against transformers 5.23's Phi-3 rotary embedding
(`longrope_frequency_update`): the same file, fed positions whose largest is `original_max - 1`
(seq_len = original_max: short factors) and `original_max` (one past: long factors)."""

import numpy as np
import pytest
import torch
from conftest import exported, ort_cpu_session

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.dtypes import EPS
from pe_export.spec import Spec
from pe_export.verification.tolerances import tolerance

transformers = pytest.importorskip("transformers")
from transformers.models.phi3 import modeling_phi3 as phi3  # noqa: E402

ORIGINAL, P, D = 256, 512, 96
SHORT = [1 + i / 100 for i in range(D // 2)]  # made-up factors: Phi-3's own lists are not shipped here
LONG = [1 + i / 5 for i in range(D // 2)]


def spec(op, mode="runtime", layout="bhsd"):
    params = dict(
        head_dim=D,
        max_positions=P,
        angles="float32",
        scaling="longrope",
        scaling_params=dict(
            short_factor=SHORT, long_factor=LONG, original_max_positions=ORIGINAL, factor=32.0, mode=mode
        ),
    )
    return Spec(encoding="rope", params=params, op=op, opset=OP_TARGETS[op].min_opset, layout=layout)


def transformers_rope(x, position_ids):
    config = transformers.Phi3Config(
        hidden_size=D * 4,
        num_attention_heads=4,
        max_position_embeddings=ORIGINAL * 32,
        original_max_position_embeddings=ORIGINAL,  # Phi3Config's top-level key overrides the block's
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": SHORT,
            "long_factor": LONG,
            "original_max_position_embeddings": ORIGINAL,
            "factor": 32.0,
        },
    )
    rotary = phi3.Phi3RotaryEmbedding(config)
    cos, sin = rotary(torch.from_numpy(x), torch.from_numpy(position_ids))
    q, _ = phi3.apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)
    return q.numpy()


def assert_close(got, want, x, op):
    """The verification bound (float32 rounding of each pair), doubled: transformers rounds too."""
    from pe_export.encodings.rope import RopeParams, inv_freq

    factor = inv_freq(RopeParams(**spec("onnx").params))[1]  # the attention factor, 1.27 here
    half = np.abs(x[..., : D // 2]) + np.abs(x[..., D // 2 :])
    bound = 2 * tolerance("fp32", op).factor * EPS["fp32"] * factor * np.concatenate([half, half], -1)
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


@pytest.mark.parametrize("op", OP_TARGETS)
@pytest.mark.parametrize("largest", [10, ORIGINAL - 1, ORIGINAL, P - 1])
def test_switch_matches_transformers(op, largest):
    sess = ort_cpu_session(exported(spec(op)))
    rng = np.random.default_rng(largest)
    ids = np.sort(rng.choice(largest + 1, size=min(32, largest + 1), replace=False))
    ids[-1] = largest
    ids = np.stack([ids, ids[::-1]])  # (2, S): batch > 1, the max anywhere in the row
    x = rng.standard_normal((2, 3, ids.shape[1], D), dtype=np.float32)
    got = sess.run(None, {"x": x, "position_ids": ids})[0]
    want = transformers_rope(x, ids)
    assert_close(got, want, x, op)
    if largest < ORIGINAL:  # the long factors give visibly different output, so the check can tell regimes apart
        long_sess = ort_cpu_session(exported(spec(op, mode="long")))
        assert np.abs(long_sess.run(None, {"x": x, "position_ids": ids})[0] - got).max() > 1e-2


@pytest.mark.parametrize("op", OP_TARGETS)
def test_long_mode_uses_long_factors_everywhere(op):
    sess = ort_cpu_session(exported(spec(op, mode="long")))
    ids = np.array([[0, 1, 5, 100]])  # all short positions
    x = np.random.default_rng(0).standard_normal((1, 2, 4, D), dtype=np.float32)
    got = sess.run(None, {"x": x, "position_ids": ids})[0]
    # transformers picks the long factors when the largest position passes the original length
    with_long = np.concatenate([ids, [[ORIGINAL]]], axis=1)
    want = transformers_rope(np.concatenate([x, x[:, :, :1]], axis=2), with_long)[:, :, :4]
    assert_close(got, want, x, op)


def test_longrope_validation():
    from pe_export.encodings.rope import RopeParams

    with pytest.raises(ValueError, match="short_factor must be a list of rotary_dim/2 = 48 numbers, got 47"):
        RopeParams(
            head_dim=96,
            scaling="longrope",
            scaling_params=dict(short_factor=[1.0] * 47, long_factor=LONG, original_max_positions=256, factor=4.0),
        )
    with pytest.raises(ValueError, match="mode must be one of runtime, long"):
        RopeParams(
            head_dim=96,
            scaling="longrope",
            scaling_params=dict(
                short_factor=SHORT, long_factor=LONG, original_max_positions=256, factor=4.0, mode="vllm"
            ),
        )


@pytest.mark.parametrize("largest", [4095, 4096, 8191])
def test_phi3_preset_matches_transformers_across_the_switch(largest):
    """The phi3-mini-128k-rope preset's own factor lists (8192 positions, so the file stays small)
    against transformers' Phi3RotaryEmbedding built from the same rope_scaling block."""
    from pe_export.presets import PRESETS

    params = {**PRESETS["phi3-mini-128k-rope"].params, "max_positions": 8192, "angles": "float32"}
    sp = params["scaling_params"]
    sess = ort_cpu_session(exported(Spec(encoding="rope", params=params, op="onnx", opset=23)))
    config = transformers.Phi3Config(
        hidden_size=3072,
        num_attention_heads=32,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": sp["short_factor"],
            "long_factor": sp["long_factor"],
            "original_max_position_embeddings": 4096,
        },
    )  # fmt: skip  (no "factor", as in Phi-3's config: transformers takes 131072 / 4096)
    rng = np.random.default_rng(largest)
    ids = np.sort(rng.choice(largest, size=31, replace=False))
    ids = np.concatenate([ids, [largest]])[None, :]
    x = rng.standard_normal((1, 2, ids.shape[1], 96), dtype=np.float32)
    cos, sin = phi3.Phi3RotaryEmbedding(config)(torch.from_numpy(x), torch.from_numpy(ids))
    want, _ = phi3.apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)
    got = sess.run(None, {"x": x, "position_ids": ids})[0]
    half = np.abs(x[..., :48]) + np.abs(x[..., 48:])
    factor = 1.1902380714238083  # sqrt(1 + ln 32 / ln 4096), Phi-3's scaling
    bound = 2 * tolerance("fp32", "onnx").factor * EPS["fp32"] * factor * np.concatenate([half, half], -1)
    assert np.all(np.abs(got - want.numpy()) <= bound), np.abs(got - want.numpy()).max()
