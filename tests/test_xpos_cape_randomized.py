"""xPos, CAPE and randomized positions: each against a pinned published implementation re-typed here,
its properties, parity under ORT CPU near the table end (what the preset matrix of test_encodings.py
does not cover: xPos's key role, CAPE's normalised path, randomized RoPE's other targets, the rotary
graph contract), the training utilities, and bad input through the CLI."""

import math

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_verified, exported, ort_cpu_session
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.encodings import ENCODINGS
from pe_export.encodings.cape import CapeParams, embed_torch
from pe_export.encodings.randomized import randomized
from pe_export.encodings.training import cape_positions, sample_positions
from pe_export.encodings.xpos import XposParams, largest_scale
from pe_export.presets import PRESETS
from pe_export.spec import Spec

# ------------------------------------------------------------------------------------------------
# torchscale XPOS, microsoft/torchscale@776b070 torchscale/component/xpos_relative_position.py, re-typed.
# One change: fixed_pos_embedding's `dtype=torch.float` is the default dtype, so the whole module runs
# in float64 under `float64()` below (torchscale forms its angles in float32 whatever x is).


def ts_fixed_pos_embedding(x):
    seq_len, dim = x.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim) / dim))
    sinusoid_inp = torch.einsum("i , j -> i j", torch.arange(0, seq_len, dtype=torch.get_default_dtype()), inv_freq).to(
        x
    )
    return torch.sin(sinusoid_inp), torch.cos(sinusoid_inp)


def ts_rotate_every_two(x):
    x1 = x[:, :, ::2]
    x2 = x[:, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


def ts_duplicate_interleave(m):
    dim0 = m.shape[0]
    m = m.view(-1, 1)
    m = m.repeat(1, 2)
    m = m.view(dim0, -1)
    return m


def ts_apply_rotary_pos_emb(x, sin, cos, scale=1):
    sin, cos = map(lambda t: ts_duplicate_interleave(t * scale), (sin, cos))
    return (x * cos) + (ts_rotate_every_two(x) * sin)


class TsXPOS(torch.nn.Module):
    def __init__(self, head_dim, scale_base=512):
        super().__init__()
        self.head_dim = head_dim
        self.scale_base = scale_base
        self.register_buffer("scale", (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim))

    def forward(self, x, offset=0, downscale=False):
        length = x.shape[1]
        min_pos = -(length + offset) // 2
        max_pos = length + offset + min_pos
        scale = self.scale ** torch.arange(min_pos, max_pos, 1).to(self.scale).div(self.scale_base)[:, None]
        sin, cos = ts_fixed_pos_embedding(scale)
        if scale.shape[0] > length:
            scale = scale[-length:]
            sin = sin[-length:]
            cos = cos[-length:]
        if downscale:
            scale = 1 / scale
        return ts_apply_rotary_pos_emb(x, sin, cos, scale)


class float64:
    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def xpos_spec(dtype="fp32", **params):
    params = {"head_dim": 64, "scale_base": 512.0, "role": "query", "max_positions": 2048, **params}
    return Spec(encoding="xpos", params=params, op="decomposed", opset=17, dtype=dtype)


def xpos_ref(x_bhsd, positions, **params):
    enc = ENCODINGS.get("xpos")
    ids = np.broadcast_to(positions, (x_bhsd.shape[0], len(positions))).copy()
    return enc.reference(xpos_spec(**params), {"x": x_bhsd, "position_ids": ids})


@pytest.mark.parametrize("scale_base", [512.0, 2048.0])  # torchscale, NeMo
@pytest.mark.parametrize("L", [1, 2, 37, 2048])
def test_xpos_matches_torchscale(L, scale_base):
    """Keys (offset 0, downscale), a prefill query (offset 0) and a decode query (length 1, offset L - 1),
    as torchscale's MultiheadAttention calls XPOS, at every length up to the table end."""
    rng = np.random.default_rng(L)
    x = rng.standard_normal((6, L, 64))  # torchscale's (B * H, S, D)
    with float64():
        ts = TsXPOS(64, scale_base)
        k = ts(torch.from_numpy(x), offset=0, downscale=True).numpy()
        q = ts(torch.from_numpy(x), offset=0, downscale=False).numpy()
        q_decode = ts(torch.from_numpy(x[:, -1:]), offset=L - 1, downscale=False).numpy()
    ours = lambda xs, pos, role: xpos_ref(xs[None], pos, role=role, scale_base=scale_base)[0]  # noqa: E731
    np.testing.assert_allclose(ours(x, np.arange(L), "key"), k, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours(x, np.arange(L), "query"), q, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours(x[:, -1:], np.array([L - 1]), "query"), q_decode, rtol=1e-10, atol=1e-10)


def test_xpos_hand_computed():
    """head_dim 2, scale_base 1, L = 3 (positions 0..2, centre ceil(3/2) = 2): zeta = 0.8 / 2.8 = 2/7,
    angle n * 1, query scale (2/7)^(n - 2). x = (1, 0) at n = 0 -> (cos 0, sin 0) * (7/2)^2 = (12.25, 0);
    at n = 2 -> (cos 2, sin 2) * 1; as a key at n = 0 -> (1, 0) * (2/7)^2."""
    x = np.zeros((1, 1, 3, 2))
    x[..., 0] = 1.0
    q = xpos_ref(x, np.arange(3), head_dim=2, scale_base=1.0, max_positions=3)[0, 0]
    k = xpos_ref(x, np.arange(3), head_dim=2, scale_base=1.0, max_positions=3, role="key")[0, 0]
    np.testing.assert_allclose(q[0], [12.25, 0.0], rtol=1e-14)
    np.testing.assert_allclose(q[1], [math.cos(1) * 3.5, math.sin(1) * 3.5], rtol=1e-14)
    np.testing.assert_allclose(q[2], [math.cos(2), math.sin(2)], rtol=1e-14)
    np.testing.assert_allclose(k[0], [(2 / 7) ** 2, 0.0], rtol=1e-14)


def test_xpos_score_depends_on_distance_only_and_decays():
    rng = np.random.default_rng(0)
    qv, kv = rng.standard_normal(64), rng.standard_normal(64)

    def score(m, n, L):  # q at m, k at n, both rotated in calls whose largest position is L - 1
        pos = np.arange(L)
        q = xpos_ref(np.broadcast_to(qv, (1, 1, L, 64)).copy(), pos)[0, 0, m]
        k = xpos_ref(np.broadcast_to(kv, (1, 1, L, 64)).copy(), pos, role="key")[0, 0, n]
        return q @ k

    for d in (0, 1, 17, 300):
        s = [score(n + d, n, L) for n, L in ((0, 400), (50, 400), (90, 1000), (600, 1200))]
        np.testing.assert_allclose(s, s[0], rtol=1e-9)
    # The decay: with a single active pair i, xPos's score is RoPE's times zeta_i^(d / scale_base).
    z = (np.arange(0, 64, 2) + 0.4 * 64) / (1.4 * 64)
    one = np.zeros(64)
    one[10:12] = [0.6, -0.8]  # pair 5
    L = 1200
    q = xpos_ref(np.broadcast_to(one, (1, 1, L, 64)).copy(), np.arange(L))[0, 0]
    k = xpos_ref(np.broadcast_to(one, (1, 1, L, 64)).copy(), np.arange(L), role="key")[0, 0]
    for d in (1, 100, 1000):
        envelope = np.hypot(q[d] @ k[0], q[d, 10:12] @ np.array([[0, 1], [-1, 0]]) @ k[0, 10:12])
        assert envelope == pytest.approx(z[5] ** (d / 512), rel=1e-12)
    # With q = k, |score(d)| <= sum_i zeta_i^(d / scale_base) |pair_i|^2, an envelope falling with d.
    pairs = qv[0::2] ** 2 + qv[1::2] ** 2
    bounds = [np.sum(z ** (d / 512) * pairs) for d in (0, 200, 600, 1100)]
    assert bounds == sorted(bounds, reverse=True)
    for d, b in zip((0, 200, 600, 1100), bounds):
        qq = xpos_ref(np.broadcast_to(qv, (1, 1, L, 64)).copy(), np.arange(L))[0, 0, d]
        kk = xpos_ref(np.broadcast_to(qv, (1, 1, L, 64)).copy(), np.arange(L), role="key")[0, 0, 0]
        assert abs(qq @ kk) <= b * (1 + 1e-12)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_xpos_key_role_parity(dtype):
    assert_verified(xpos_spec(dtype, role="key"))


@pytest.mark.parametrize("role", ["query", "key"])
def test_xpos_parity_near_the_fp16_overflow_limit(role):
    """4500 positions: the largest F is 250, just under fp16's limit of 256 (reached near 4532)."""
    assert_verified(xpos_spec("fp16", role=role, max_positions=4500))


@pytest.mark.parametrize("dtype,scale", [("fp32", 1 + 2**-21), ("fp16", 1 + 2**-10), ("bf16", 1 + 2**-7)])
def test_xpos_scale_table_off_by_a_few_roundings_fails(dtype, scale):
    """The bound is the graph's rounding bound (xpos_magnitude): float32 arithmetic, then one rounding
    to the export dtype. So the float32 scale table F scaled by 4 float32 ulp (fp32 file), or by one
    eps of the export dtype (fp16, bf16 files: a relative error twice that of the final rounding)
    fails, while the same file unscaled passes. Measured at 512 positions: worst ratio 2.3 (fp32) and
    3.0 (fp16, bf16); the earlier fp16/bf16 bound, the float32 arithmetic's at eps(dtype), passed
    the fp16 and bf16 cases at 0.58."""
    from onnx import numpy_helper

    from pe_export.verification.parity import check

    spec = xpos_spec(dtype, max_positions=512)
    model = onnx.load_from_string(exported(spec))
    runtimes = ("ort-cpu", "onnx-reference")
    assert all(r.verdict == "pass" for r in check(spec, model.SerializeToString(), runtimes=runtimes))
    table = next(t for t in model.graph.initializer if t.name == "scale_table")
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) * np.float32(scale), table.name))
    rows = check(spec, model.SerializeToString(), runtimes=runtimes)
    assert [r.verdict for r in rows] == ["FAIL", "FAIL"], [(r.runtime, r.worst_ratio) for r in rows]


def test_xpos_fp16_overflow_is_refused_not_inf():
    """fp16 tables whose scale would pass sqrt(65504) are refused; the largest accepted one stays finite
    at its most scaled position (position 0 in a call that reaches the table end)."""
    assert (
        largest_scale(XposParams(head_dim=64, max_positions=4096))
        < 256
        < largest_scale(XposParams(head_dim=64, max_positions=4600))
    )
    with pytest.raises(ValueError, match="square root of fp16"):
        ENCODINGS.get("xpos").module(xpos_spec("fp16", max_positions=4600))
    ENCODINGS.get("xpos").module(xpos_spec("fp32", max_positions=4600))  # fp32 has room, up to about 36000
    with pytest.raises(ValueError, match="square root of fp32"):
        XposParams(head_dim=64, max_positions=40000)
    spec = xpos_spec("fp16", max_positions=4096)
    ids = np.array([[0, 1, 4095]], dtype=np.int64)
    x = np.full((1, 3, 3, 64), 100.0, dtype=np.float16)  # |x| 100 < 256: F * x <= 150 * 200 fits fp16
    y = ort_cpu_session(exported(spec)).run(None, {"x": x, "position_ids": ids})[0]
    assert np.isfinite(y).all()
    truth = ENCODINGS.get("xpos").reference(spec, {"x": x, "position_ids": ids})
    assert np.max(np.abs(y - truth) / np.abs(truth).max()) < 2e-3


# ------------------------------------------------------------------------------------------------
# CAPE1d, gcambara/cape@058df08 cape/cape.py, re-typed (forward and _augment_positions).


class CAPE1d(torch.nn.Module):
    def __init__(
        self,
        d_model,
        max_global_shift=0.0,
        max_local_shift=0.0,
        max_global_scaling=1.0,
        normalize=False,
        pos_scale=1.0,
        freq_scale=1.0,
        batch_first=False,
    ):
        super().__init__()
        assert max_global_scaling >= 1
        self.max_global_shift = max_global_shift
        self.max_local_shift = max_local_shift
        self.max_global_scaling = max_global_scaling
        self.normalize = normalize
        self.pos_scale = pos_scale
        self.freq_scale = freq_scale
        self.batch_first = batch_first
        freq = freq_scale * torch.exp(torch.arange(0, d_model, 2) * (-math.log(1e4) / d_model))
        self.register_buffer("freq", freq)

    def forward(self, x):
        if self.batch_first:
            batch_size, n_tokens, n_feats = x.shape
        else:
            n_tokens, batch_size, n_feats = x.shape
        positions = (torch.full((batch_size, 1), self.pos_scale) * torch.arange(n_tokens).unsqueeze(0)).to(x)
        positions = self._augment_positions(positions)
        positions = positions.unsqueeze(-1)
        product = positions * self.freq
        pos_emb = torch.zeros(batch_size, n_tokens, n_feats, device=x.device)
        pos_emb[:, :, 0::2] = torch.sin(product)
        pos_emb[:, :, 1::2] = torch.cos(product)
        if not self.batch_first:
            pos_emb = pos_emb.transpose(0, 1)
        return pos_emb

    def _augment_positions(self, positions):
        assert self.max_global_scaling >= 1
        if self.normalize:
            positions -= torch.mean(positions[~positions.isnan()].view(positions.shape), axis=1, keepdim=True)
        if self.training:
            batch_size, n_tokens = positions.shape
            delta = torch.FloatTensor(batch_size, 1).uniform_(-self.max_global_shift, self.max_global_shift)
            if self.max_local_shift:
                epsilon = self.pos_scale * self.max_local_shift
                delta_local = torch.FloatTensor(batch_size, n_tokens).uniform_(-epsilon / 2.0, epsilon / 2.0)
            else:
                delta_local = 0
            log_lambdas = torch.FloatTensor(batch_size, 1).uniform_(
                -math.log(self.max_global_scaling), math.log(self.max_global_scaling)
            )
            positions = (positions + delta + delta_local) * torch.exp(log_lambdas)
        return positions


AUDIO = dict(
    max_global_shift=60.0, max_local_shift=1.0, max_global_scaling=1.1, normalize=True, pos_scale=0.03, freq_scale=30.0
)
RECIPES = {
    "text": {k: v for k, v in PRESETS["cape-text"].params.items() if k not in ("dim", "max_positions")},
    "audio": AUDIO,
}


def cape_spec(dtype="fp32", **params):
    return Spec(
        encoding="cape", params={"dim": 512, "max_positions": 2048, **params}, op="decomposed", opset=17, dtype=dtype
    )


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("T", [1, 7, 2048])
def test_cape_matches_cape1d_in_eval_mode(recipe, T):
    with float64():
        cape = CAPE1d(512, **RECIPES[recipe], batch_first=True).eval()
        want = cape(torch.zeros(2, T, 512)).numpy()
    got = ENCODINGS.get("cape").reference(cape_spec(**RECIPES[recipe]), {"position_ids": np.tile(np.arange(T), (2, 1))})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_cape_with_neutral_scales_is_sinusoidal():
    ids = np.array([[0, 5, 2047], [2047, 1000, 3]])
    cape, sin = (
        cape_spec(max_global_shift=5.0, max_global_scaling=1.03),
        Spec(encoding="sinusoidal", params=dict(dim=512, max_positions=2048), op="decomposed", opset=17),
    )
    want = ENCODINGS.get("sinusoidal").reference(sin, {"position_ids": ids})
    np.testing.assert_allclose(ENCODINGS.get("cape").reference(cape, {"position_ids": ids}), want, rtol=0, atol=1e-12)
    got = ort_cpu_session(exported(cape)).run(None, {"position_ids": ids})[0]
    np.testing.assert_allclose(
        got, ort_cpu_session(exported(sin)).run(None, {"position_ids": ids})[0], rtol=0, atol=2**-24
    )


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cape_normalised_parity(dtype):
    assert_verified(cape_spec(dtype, **AUDIO))


def test_cape_training_augmentation_matches_cape1d():
    """Same seed, same draws: cape_positions(training=True) equals CAPE1d's training positions bit for bit."""
    for recipe in RECIPES.values():
        p = CapeParams(dim=512, **recipe)
        cape = CAPE1d(512, **recipe, batch_first=True).train()
        base = (torch.full((3, 1), p.pos_scale) * torch.arange(50).unsqueeze(0)).float()
        torch.manual_seed(7)
        want = cape._augment_positions(base.clone())
        torch.manual_seed(7)
        got = cape_positions(torch.arange(50).repeat(3, 1), p, training=True)
        assert torch.equal(got, want)  # exact: the same elementwise draws
        ratio = got / cape_positions(torch.arange(50).repeat(3, 1), p, training=False)
        assert not torch.allclose(ratio, torch.ones_like(ratio))  # the augmentation did something
    # In eval mode there is nothing random, and the torch embedding of it is the exported reference.
    p = CapeParams(dim=512, **AUDIO)
    ids = torch.arange(64).repeat(2, 1)
    emb = embed_torch(cape_positions(ids, p, training=False, dtype=torch.float64), p).numpy()
    ref = ENCODINGS.get("cape").reference(cape_spec(**AUDIO), {"position_ids": ids.numpy()})
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-12)


def test_exported_graphs_are_deterministic():
    """Nothing random reaches a graph: no RandomUniform / RandomNormal / Multinomial nodes."""
    for preset in ("cape-text", "randomized-rope"):
        p = PRESETS[preset]
        spec = Spec(encoding=p.encoding, params={**p.params, "max_positions": 64}, op="decomposed", opset=17)
        ops = {n.op_type for n in onnx.load_from_string(exported(spec)).graph.node}
        assert not {o for o in ops if o.startswith("Random") or o == "Multinomial"}, ops
    assert {
        n.op_type for n in onnx.load_from_string(exported(cape_spec(max_positions=64, **AUDIO))).graph.node
    }.isdisjoint({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial"})


# ------------------------------------------------------------------------------------------------
# Randomized positions


def test_sampled_positions_are_sorted_unique_and_below_noise_max_length():
    g = torch.Generator().manual_seed(0)
    ids = sample_positions(64, 40, 2048, generator=g)
    assert ids.shape == (64, 40) and ids.dtype == torch.int64
    assert (ids[:, 1:] > ids[:, :-1]).all()  # sorted and unique
    assert ids.min() >= 0 and ids.max() < 2048
    assert ids.max() > 1900 and ids.min() < 100  # the whole range is used, not only [0, 40)
    assert torch.equal(sample_positions(3, 8, 8), torch.arange(8).repeat(3, 1))  # M = N: every position
    with pytest.raises(ValueError, match="noise_max_length .* must be >= train_length 40"):
        sample_positions(2, 40, 39)


@pytest.mark.parametrize("op", ["onnx", "ort"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_randomized_rope_keeps_rope_targets(op, dtype):
    from pe_export.custom_ops.lowerings import OP_TARGETS

    p = PRESETS["randomized-rope"]
    spec = Spec(encoding=p.encoding, params=p.params, op=op, opset=OP_TARGETS[op].min_opset, dtype=dtype)
    from pe_export.verification.parity import check

    rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=("torch", "ort-cpu"))}
    assert all(r.verdict == "pass" for r in rows.values()), [r.note for r in rows.values()]
    assert rows["ort-cpu"].provider.startswith("CPUExecutionProvider")


def test_randomized_wraps_absolute_and_bias_encodings():
    """The same wrapper over sinusoidal (NOISY_SIN_COS) and ALiBi, fed sampled positions: parity, and the
    refusal of noise_max_length < train_length."""
    from pe_export.verification.parity import check

    for name, params in (("sinusoidal", dict(dim=64)), ("alibi", dict(heads=4))):
        enc = randomized(ENCODINGS.get(name))
        with pytest.raises(ValueError, match="noise_max_length"):
            enc.params(**params, max_positions=16, train_length=17)
        spec = Spec(
            encoding=name, params={**params, "max_positions": 256, "train_length": 40}, op="decomposed", opset=17
        )
        ENCODINGS._items[enc.name] = enc  # registered for this test only, so check() can find it by name
        try:
            spec = Spec(encoding=enc.name, params=spec.params, op="decomposed", opset=17)
            rows = check(spec, exported(spec), runtimes=("torch", "ort-cpu"))
            assert all(r.verdict == "pass" for r in rows), [r.note for r in rows]
            assert "sampled" in rows[0].probes
        finally:
            del ENCODINGS._items[enc.name]


RUNTIME_ROTARY = ["xpos", "randomized-rope"]


@pytest.mark.parametrize("preset", RUNTIME_ROTARY)
def test_rotary_graph_contract(preset):
    """What test_encodings.test_graph_contract checks for the other contracts, for these rotary ones."""
    p = PRESETS[preset]
    spec = Spec(encoding=p.encoding, params={**p.params, "max_positions": 64}, op="decomposed", opset=17)
    model = onnx.load_from_string(exported(spec))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    D = p.params["head_dim"]
    assert [(i.name, dims(i)) for i in model.graph.input] == [
        ("x", ["batch", "heads", "seq", D]),
        ("position_ids", ["batch", "seq"]),
    ]
    assert [(o.name, dims(o)) for o in model.graph.output] == [("y", ["batch", "heads", "seq", D])]
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}


# ------------------------------------------------------------------------------------------------
# CLI

runner = CliRunner()


@pytest.mark.parametrize(
    "args,message",
    [
        (["xpos", "--scale-base", "-1"], "scale_base must be a finite number > 0, got -1.0"),
        (["xpos", "--head-dim", "63"], "head_dim must be even"),
        (["xpos", "--role", "value"], "role must be one of query, key"),
        (["xpos", "--seq", "16384", "--dtype", "fp16"], "square root of fp16"),
        (["randomized-rope", "--seq", "32"], "noise_max_length (max_positions, --seq) must be >= train_length 40"),
        (["randomized-rope", "--train-length", "4096"], "must be >= train_length 4096"),
        (["cape-text", "--max-global-scaling", "0.5"], "max_global_scaling must be a finite number >= 1"),
    ],
)
def test_cli_bad_input(tmp_path, args, message):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize("preset", ["xpos", "cape-text", "randomized-rope"])
def test_cli_exports(tmp_path, preset):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, [preset, "--seq", "64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and "verified" in result.output
