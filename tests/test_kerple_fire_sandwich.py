"""KERPLE, FIRE and Sandwich against transcriptions of their published implementations (KERPLE@73f1ee2,
the FIRE reproduction in mcleish7/arithmetic, NeMo@000b931), hand-computed values, the property each
paper claims, weights files, parity off the presets' defaults, and bad input through the CLI."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_verified, assert_within_ulps, exported, ort_cpu_session
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.encodings import fire, kerple, sandwich
from pe_export.encodings.fire import FireParams
from pe_export.encodings.kerple import KerpleParams
from pe_export.encodings.sandwich import SandwichParams
from pe_export.spec import Spec

runner = CliRunner()


def bias(encoding, q, k, dtype="fp32", **params):
    spec = Spec(encoding=encoding, params=params, op="decomposed", opset=17, dtype=dtype)
    return ENC[encoding].reference(spec, {"query_positions": np.asarray(q), "key_positions": np.asarray(k)})


ENC = {"kerple": kerple, "fire": fire, "sandwich": sandwich}


# --------------------------------------------------------------------------------------------------
# KERPLE


def kerple_transcription(variant, p, a, seq_len_q, seq_len_k):
    """chijames/KERPLE@73f1ee2 megatron/mpu/layers.py ParallelKerpleLog / ParallelKerplePower.forward
    (bias_ap, no weight kernel), in float64, with the parameters as (H, 1, 1) tensors."""
    eps = 1e-2
    bias_p, bias_a = (
        torch.tensor(p, dtype=torch.float64)[:, None, None],
        torch.tensor(a, dtype=torch.float64)[:, None, None],
    )
    diff = torch.tril(
        torch.arange(seq_len_k).view(seq_len_k, 1).repeat(1, seq_len_k) + torch.arange(0, -seq_len_k, -1)
    ).to(torch.float64)
    if variant == "log":
        bias = -bias_p.clamp(min=eps) * torch.log(1 + bias_a.clamp(min=eps) * diff)
    else:
        bias = -diff.pow(bias_p.clamp(min=eps, max=2)) * bias_a.clamp(min=eps)
    if seq_len_q != seq_len_k:
        assert seq_len_q == 1
        bias = bias[:, seq_len_k - 1, :].view(bias.shape[0], 1, bias.shape[2])
    return bias.numpy()


@pytest.mark.parametrize("variant", ["log", "power"])
def test_kerple_is_the_published_forward(variant):
    p_, a_ = kerple.kernel_params(KerpleParams(heads=5, variant=variant, init_seed=3))
    p_list, a_list = [0.005, *p_[1:].tolist()], [*a_[:-1].tolist(), 0.001]  # two below the clamp
    for q_len, k_len in ((300, 300), (1, 300), (1, 2048)):
        want = kerple_transcription(variant, p_list, a_list, q_len, k_len)
        got = bias(
            "kerple", np.arange(k_len - q_len, k_len), np.arange(k_len), heads=5, variant=variant, p=p_list, a=a_list
        )[0]
        lower = np.isfinite(got)  # the transcription has 0 where j > i (masked in its attention); we have -inf
        assert np.array_equal(
            lower, np.broadcast_to(np.tril(np.ones((k_len, k_len), bool))[k_len - q_len :], got.shape)
        )
        np.testing.assert_allclose(got[lower], want[lower], rtol=1e-15, atol=1e-12)


def test_kerple_hand_computed():
    # log: -p log(1 + a d). Head 0 (p 1, a 1) at d 1: -log 2 = -0.6931472; head 1 (p 2, a 0.5) at d 3:
    # -2 log 2.5 = -1.8325815. d 0 gives 0 in every head.
    b = bias("kerple", [3], [0, 2, 3], heads=2, p=[1.0, 2.0], a=[1.0, 0.5])[0]
    assert b[0, 0].tolist() == pytest.approx([-math.log(4), -0.6931472, 0.0], abs=1e-7)
    assert b[1, 0, 0] == pytest.approx(-1.8325815, abs=1e-7)
    # power: -a d^p. Head 0 (p 1, a 0.5) at d 3: -1.5; head 1 (p 2, a 0.25) at d 3: -0.25 * 9 = -2.25;
    # head 1 at d 2: -1.0. p 0.004 is clamped to 0.01 (the reference's eps): -1 * 3^0.01 = -1.0110466.
    b = bias("kerple", [3], [0, 1, 3], heads=3, variant="power", p=[1.0, 2.0, 0.004], a=[0.5, 0.25, 1.0])[0]
    assert b[:, 0, 0].tolist() == pytest.approx([-1.5, -2.25, -1.0110466], abs=1e-7)
    assert b[1, 0, 1] == -1.0
    # The default is the reference's initialisation: p = 2 U(0, 1), a = U(0, 1), clamped at 1e-2.
    p_, a_ = kerple.kernel_params(KerpleParams(heads=64))
    assert 0.01 <= p_.min() and p_.max() < 2 and 0.01 <= a_.min() and a_.max() < 1 and p_.mean() > 2 * a_.mean() - 0.5


@pytest.mark.parametrize("variant", ["log", "power"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kerple_is_monotone_in_distance(variant, seed):
    t = kerple.table(KerpleParams(heads=12, variant=variant, init_seed=seed, max_positions=4096))  # (P, H)
    assert np.all(np.diff(t, axis=0) <= 0) and np.all(t[0] == 0)
    b = bias("kerple", np.arange(100), np.arange(100), heads=12, variant=variant, causal=False, init_seed=seed)[0]
    assert np.array_equal(b, b.transpose(0, 2, 1))  # --no-causal: the kernel at |i - j| (exact: one table read)


def test_kerple_fp16_saturates_instead_of_overflowing():
    """-0.5 * 2047^2 is far below fp16's -65504: stored as -65504, so -inf stays the mask alone."""
    params = dict(heads=2, variant="power", p=[2.0, 1.0], a=[0.5, 1.0], max_positions=2048)
    spec = Spec(encoding="kerple", params=params, op="decomposed", opset=17, dtype="fp16")
    inputs = {"query_positions": np.array([2047]), "key_positions": np.array([0, 2047])}
    got = ort_cpu_session(exported(spec)).run(None, inputs)[0]
    assert got[0, 0, 0, 0] == -65504 and got[0, 1, 0, 0] == -2047 and np.all(np.isfinite(got))
    assert kerple.reference(spec, inputs)[0, 0, 0, 0] == -65504
    assert_verified(spec)


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(heads=2, p=[1.0]), r"p must list one value per head \(2\), got 1 values"),
        (dict(heads=2, a=[1.0, 2.0, 3.0]), r"a must list one value per head \(2\), got 3 values"),
        (dict(heads=2, variant="power", p=[1.0, 2.5]), "p of the power kernel must be finite with 0 < p <= 2, got 2.5"),
        (dict(heads=2, p=[1.0, 0.0]), "p of the log kernel must be finite with p > 0, got 0.0"),
        (dict(heads=2, a=[-1.0, 1.0]), "a of the log kernel must be finite with a > 0, got -1.0"),
        (dict(heads=2, p=[1.0, float("nan")]), "must be finite"),
        (dict(heads=2, variant="rbf"), "variant must be one of log, power, got 'rbf'"),
        (dict(heads=0), "heads must be an integer >= 1, got 0"),
    ],
)
def test_kerple_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        KerpleParams(**params)


# --------------------------------------------------------------------------------------------------
# FIRE


class ReproductionFIRE(torch.nn.Module):
    """The public FIRE reproduction (mcleish7/arithmetic cramming/architectures/embeddings.py, class FIRE),
    transcribed: its __init__ and forward, positions 0..S-1, bias (1, H, S, S) unmasked."""

    def __init__(self, num_heads=12, mlp_width=32, init_c=0.1, init_L=512.0, eps=1e-6):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(1, mlp_width), torch.nn.ReLU(), torch.nn.Linear(mlp_width, num_heads)
        )
        self.c = torch.nn.Parameter(torch.tensor(init_c))
        self.init_L = torch.nn.Parameter(torch.tensor(init_L), requires_grad=False)
        self.L_multiplier = torch.nn.Parameter(torch.tensor(1.0))
        self.eps = eps

    def forward(self, seq_length):
        positions = torch.arange(seq_length, dtype=self.c.dtype)
        rel_distance = positions[:, None] - positions[None, :]
        threshold = torch.abs(self.L_multiplier * self.init_L)
        pos_normalizer = torch.max(positions, threshold)[:, None]
        rel_distance = torch.log(torch.abs(self.c * rel_distance) + 1)
        pos_normalizer = torch.log(torch.abs(self.c * pos_normalizer) + 1) + self.eps
        normalized_distance = rel_distance / pos_normalizer
        return self.mlp(normalized_distance.unsqueeze(-1)).unsqueeze(0).permute(0, 3, 1, 2)


def trained_reproduction(heads=4, width=8, init_L=64.0, seed=0):
    torch.manual_seed(seed)
    m = ReproductionFIRE(num_heads=heads, mlp_width=width, init_L=init_L)
    with torch.no_grad():  # as if trained: c and L moved off their initial values
        m.c.fill_(0.37)
        m.L_multiplier.fill_(-1.25)  # the threshold takes |L_multiplier * init_L|
    return m


def save(path, tensors: dict):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    else:
        torch.save(tensors, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_fire_is_the_reproduction_with_its_weights_file(tmp_path, suffix):
    m = trained_reproduction()
    state = {f"model.layers.0.fire.{k}": v for k, v in m.state_dict().items()}  # init_L included
    save(tmp_path / f"w{suffix}", state | {"model.other": torch.zeros(3)})
    params = dict(
        heads=4,
        mlp_width=8,
        init_L=64.0,
        max_positions=200,
        weights=str(tmp_path / f"w{suffix}"),
        key="model.layers.0.fire",
    )
    with torch.no_grad():
        want32 = m(200)[0].numpy()  # float32, as the reproduction runs
        want = m.double()(200)[0].numpy()
    got = bias("fire", np.arange(200), np.arange(200), **params)[0]
    lower = np.tril(np.ones((200, 200), bool))
    assert np.all(np.isneginf(got[:, ~lower]))
    np.testing.assert_allclose(got[:, lower], want[:, lower], rtol=1e-12, atol=1e-12)
    # The graph, in float32, against the reproduction's own float32 forward.
    spec = Spec(encoding="fire", params=params, op="decomposed", opset=17)
    graph = ort_cpu_session(exported(spec)).run(
        None, {"query_positions": np.arange(200), "key_positions": np.arange(200)}
    )[0][0]
    np.testing.assert_allclose(graph[:, lower], want32[:, lower], rtol=0, atol=1e-5)
    assert_verified(spec)
    assert_verified(Spec(encoding="fire", params=params, op="decomposed", opset=17, dtype="fp16"))


def test_fire_hand_computed(tmp_path):
    """W = 2, H = 2: hidden [x, relu(0.5 - x)], outputs [x, 2 relu(0.5 - x)]; c = 1, L = |1 * 4| = 4.
    Query 2, key 0: x = log(1 + 2) / (log(1 + max(2, 4)) + 1e-6) = 1.0986123 / 1.6094389 = 0.6826058,
    so the biases are 0.6826058 and 0. Query 9, key 8: x = log 2 / (log 10 + 1e-6) = 0.6931472 /
    2.3025861 = 0.3010299, biases 0.3010299 and 2 (0.5 - 0.3010299) = 0.3979403. Key = query: x = 0, 0 and 1."""
    save(
        tmp_path / "f.safetensors",
        {
            "mlp.0.weight": torch.tensor([[1.0], [-1.0]]),
            "mlp.0.bias": torch.tensor([0.0, 0.5]),
            "mlp.2.weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
            "mlp.2.bias": torch.tensor([0.0, 0.0]),
            "c": torch.tensor(1.0),
            "L_multiplier": torch.tensor(1.0),
        },
    )
    params = dict(heads=2, mlp_width=2, init_L=4.0, max_positions=16, weights=str(tmp_path / "f.safetensors"), key="")
    b = bias("fire", [2, 9], [0, 8, 9], **params)[0]
    assert b[:, 0, 0].tolist() == pytest.approx([0.6826058, 0.0], abs=1e-7)
    assert b[:, 1, 1].tolist() == pytest.approx([0.3010299, 0.3979403], abs=1e-7)
    # exact: x = 0 and dyadic weights, so every product and sum of the output layer is exact
    assert b[:, 1, 2].tolist() == [0.0, 1.0] and np.isneginf(b[:, 0, 1:]).all()


def test_fire_input_and_what_the_bias_depends_on():
    p = FireParams(heads=12, max_positions=2048)
    t = fire.learned(p)
    i = np.arange(2048)
    x = fire.inputs_np(p, t, i, i)
    lower = np.tril(np.ones((2048, 2048), bool))
    assert x[lower].min() == 0 and x[lower].max() < 1  # in [0, 1] for j <= i, at any length
    # Depends only on (i - j, i): scattered keys read the same values as the full rows ...
    # The MLP input and hidden units are table reads and elementwise math (the same bits for any subset);
    # the output layer is a float64 matmul over W = 32 plus b2, which BLAS sums in an order that depends
    # on the shape and the CPU. Each order is within (W + 1) u S of the exact sum, S = sum_w |h_w w2_w| +
    # |b2| (the terms' magnitude: outputs near 0 cancel), so two orders differ by at most 2 (W + 1) u S,
    # under 2 (W + 1) = 66 ulps of S. A dependence on anything else moves the bias by far more.
    rng = np.random.default_rng(0)
    q, k = rng.integers(0, 2048, 40), rng.integers(0, 2048, 50)
    full = bias("fire", np.arange(2048), np.arange(2048), heads=12)[0]
    spec = Spec(encoding="fire", params=dict(heads=12), op="decomposed", opset=17)
    _, h, _, t = fire.forward_np(spec, {"query_positions": np.arange(2048), "key_positions": np.arange(2048)})
    S = (np.abs(h) @ np.abs(t["w2"]).T + np.abs(t["b2"])).transpose(2, 0, 1)  # (H, Q, K)
    why = "two BLAS summation orders of W + 1 = 33 terms differ by at most 2 (W + 1) ulps of their magnitude"
    assert_within_ulps(bias("fire", q, k, heads=12)[0], full[:, q][:, :, k], 66, why, scale=S[:, q][:, :, k])
    # ... and below the threshold L = 512 on the distance alone (progressive interpolation starts at L).
    d = 5
    rows = np.array([full[:, i, i - d] for i in range(d, 512)])  # (507, H), one matmul row each
    scale = np.array([S[:, i, i - d] for i in range(d, 512)])
    assert_within_ulps(rows, np.broadcast_to(rows[0], rows.shape), 66, why, scale=np.maximum(scale, scale[0]))
    assert not np.allclose(full[:, 1000, 1000 - d], full[:, 2000, 2000 - d])


def test_fire_weights_file_errors(tmp_path):
    m = trained_reproduction()
    save(tmp_path / "w.pt", {f"fire.{k}": v for k, v in m.state_dict().items() if k != "c"})
    with pytest.raises(ValueError, match="missing c; want exactly"):
        fire.learned(FireParams(heads=4, mlp_width=8, init_L=64.0, weights=str(tmp_path / "w.pt"), key="fire"))
    save(tmp_path / "w.pt", {f"fire.{k}": v for k, v in m.state_dict().items()})
    with pytest.raises(ValueError, match=r"'mlp.2.weight' under 'fire' .* has shape \(4, 8\), want \(3, 8\)"):
        fire.learned(FireParams(heads=3, mlp_width=8, init_L=64.0, weights=str(tmp_path / "w.pt"), key="fire"))
    with pytest.raises(ValueError, match="'init_L' under 'fire' .* is 64.0, but init_L is 512.0"):
        fire.learned(FireParams(heads=4, mlp_width=8, weights=str(tmp_path / "w.pt"), key="fire"))


@pytest.mark.parametrize("scale", [1 + 1e-5, 1 - 1e-5])
def test_fire_num_table_off_by_1e5_fails_in_fp32(scale):
    """The fp32 bound is the first-order rounding bound of the graph's arithmetic (fire.magnitude),
    so the `num` table (psi(c d)) scaled by 1 +- 1e-5, about 84 float32 ulp, fails on ORT CPU and the
    reference evaluator, while the same file unscaled passes (measured with the preset's parameters at
    512 positions: worst ratio 0.06 clean, 1.41 scaled; the earlier bound, four times looser, passed it
    at 0.38 at 2048 positions)."""
    import onnx
    from onnx import numpy_helper

    from pe_export.verification.parity import check

    spec = Spec(
        encoding="fire",
        params=dict(heads=12, mlp_width=32, init_c=0.1, init_L=512.0, max_positions=512),
        op="decomposed",
        opset=17,
    )
    model = onnx.load_from_string(exported(spec))
    runtimes = ("ort-cpu", "onnx-reference")
    assert all(r.verdict == "pass" for r in check(spec, model.SerializeToString(), runtimes=runtimes))
    num = next(t for t in model.graph.initializer if t.name == "num")
    num.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(num) * np.float32(scale), "num"))
    rows = check(spec, model.SerializeToString(), runtimes=runtimes)
    assert [r.verdict for r in rows] == ["FAIL", "FAIL"], [(r.runtime, r.worst_ratio) for r in rows]
    assert all("over its bound" in r.note for r in rows)


# --------------------------------------------------------------------------------------------------
# Sandwich


def nemo_sandwich(bidirectional, num_attention_heads, hidden_size, max_seq_len, query_seq_length, key_seq_length):
    """NVIDIA/NeMo@000b931 SandwichRelativePositionEmbedding.forward with build_relative_position(full=True)
    (alibi_relative_position_embedding.py), transcribed in float64 with torch.cuda.current_device() -> CPU."""
    relative_position = torch.arange(1 - max_seq_len, 1)[None, :].mul(-1)
    memory_position = torch.arange(1 - max_seq_len, 1)[:, None].mul(-1)
    relative_position = torch.abs(memory_position - relative_position).to(torch.float64)
    relative_position = relative_position[-query_seq_length:, -key_seq_length:]
    if not bidirectional:
        relative_position = torch.tril(relative_position)
    inv_freq = 1.0 / (10000 ** (2 * torch.arange(1, hidden_size / 2 + 1, dtype=torch.float64) / hidden_size))
    _bias = torch.sum((relative_position[:, :, None].repeat(1, 1, len(inv_freq)) * inv_freq).cos(), axis=2)
    bias = _bias.repeat(num_attention_heads, 1, 1)
    bias_scales = torch.arange(1, num_attention_heads + 1, 1, dtype=torch.float64)[
        :, None, None
    ]  # NeMo: int, so / H is float32
    return ((bias - hidden_size / 2) / (bias_scales * 8 / num_attention_heads)).unsqueeze(0).numpy()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,hidden_size", [(12, 64), (5, 128), (8, 2)])
def test_sandwich_is_nemo(causal, heads, hidden_size):
    # NeMo `tril`s the sliced (Q, K) matrix by index, which is the causal mask only when Q = K; with a
    # cache (Q < K) its own attention mask decides. So Q != K is compared in the bidirectional form.
    for q_len, k_len in ((256, 256), (300, 300)) if causal else ((256, 256), (1, 256), (7, 300)):
        want = nemo_sandwich(not causal, heads, hidden_size, 300, q_len, k_len)[0]
        got = bias(
            "sandwich",
            np.arange(k_len - q_len, k_len),
            np.arange(k_len),
            heads=heads,
            hidden_size=hidden_size,
            causal=causal,
            max_positions=300,
        )[0]
        keep = np.isfinite(got)  # NeMo's tril gives 0 where j > i (masked in its attention); we have -inf
        assert keep.all() != causal
        np.testing.assert_allclose(got[keep], want[keep], rtol=1e-13, atol=1e-12)


def test_sandwich_hand_computed():
    # D = 4: inv_freq = [10000^-0.5, 10000^-1] = [0.01, 0.0001]. At distance 100:
    # cos(1) + cos(0.01) - 2 = 0.5403023 + 0.9999500 - 2 = -0.4597477; H = 8: head 0 divides by 1,
    # head 3 by 4 (-0.1149369). At distance 0: 2 - 2 = 0 in every head.
    b = bias("sandwich", [100], [0, 100], heads=8, hidden_size=4, max_positions=128)[0]
    assert b[0, 0, 0] == pytest.approx(-0.4597477, abs=1e-7) and b[3, 0, 0] == pytest.approx(-0.1149369, abs=1e-7)
    assert np.all(b[:, 0, 1] == 0)


def test_sandwich_depends_on_the_distance_and_decays():
    rng = np.random.default_rng(1)
    q, k = rng.integers(0, 1000, 30), rng.integers(0, 1000, 40)
    base = bias("sandwich", q, k, heads=12, causal=False)  # exact below: reads of one (P, H) table at |i - j|
    assert np.array_equal(base, bias("sandwich", q + 1000, k + 1000, heads=12, causal=False))  # only i - j
    assert np.array_equal(
        base, bias("sandwich", k, q, heads=12, causal=False).transpose(0, 1, 3, 2)
    )  # and only |i - j|
    # The paper claims a logarithmically decaying bias (like KERPLE's log kernel), not a monotone one:
    # the cosine sum oscillates (D = 64: strictly decreasing only up to distance 7). Checked: strictly
    # decreasing from 0 to 7, and its mean over each octave [2^k, 2^(k+1)) decreasing in every head up to
    # 16384, where the lowest frequency 1e-4 starts to come back around (its period is 2 pi 10^4).
    t = sandwich.table(SandwichParams(heads=12, hidden_size=64, max_positions=16384))
    assert np.all(np.diff(t[:8], axis=0) < 0) and np.any(np.diff(t[:9], axis=0)[-1] > 0)
    octaves = np.array([t[2**k : 2 ** (k + 1)].mean(axis=0) for k in range(14)])  # (14, H)
    assert np.all(np.diff(octaves, axis=0) < 0)


# --------------------------------------------------------------------------------------------------
# Parity off the presets' defaults (the generated matrix runs the presets), near the table end


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize(
    "encoding,params",
    [
        ("kerple", dict(heads=4, variant="log", causal=False, init_seed=7, max_positions=4096)),
        ("kerple", dict(heads=3, variant="power", p=[0.3, 1.0, 1.9], a=[0.9, 0.05, 0.001], max_positions=4096)),
        ("sandwich", dict(heads=12, hidden_size=128, causal=False, max_positions=4096)),
        ("fire", dict(heads=6, mlp_width=16, init_c=0.5, init_L=100.0, weights_seed=3, max_positions=4096)),
    ],
)
def test_parity_off_the_presets(encoding, params, dtype):
    assert_verified(Spec(encoding=encoding, params=params, op="decomposed", opset=17, dtype=dtype))


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_lists_and_exports_with_lists_and_weights(tmp_path):
    listed = runner.invoke(app, ["list"])
    assert all(n in listed.output for n in ("kerple-log", "kerple-power", "fire", "sandwich"))
    ok = runner.invoke(
        app,
        [
            "kerple-power",
            "--seq",
            "64",
            "--heads",
            "2",
            "--p",
            "0.5",
            "--p",
            "2",
            "--a",
            "0.1",
            "--a",
            "1",
            "-o",
            str(tmp_path / "k.onnx"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    from pe_export.pipeline.onnx_export import load

    _, spec = load(tmp_path / "k.onnx")
    assert spec.params["p"] == [0.5, 2.0] and spec.params["a"] == [0.1, 1.0]
    m = trained_reproduction()
    save(tmp_path / "w.safetensors", {f"fire.{k}": v for k, v in m.state_dict().items()})
    out = tmp_path / "f.onnx"
    ok = runner.invoke(
        app,
        [
            "fire",
            "--seq",
            "128",
            "--heads",
            "4",
            "--mlp-width",
            "8",
            "--init-L",
            "64",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--key",
            "fire",
            "-o",
            str(out),
        ],
    )
    assert ok.exit_code == 0, ok.output
    _, spec = load(out)
    assert spec.params["key"] == "fire" and len(spec.params["weights_sha256"]) == 64
    assert runner.invoke(app, ["verify", str(out), "--providers", "cpu"]).exit_code == 0
    with torch.no_grad():
        m.mlp[2].bias.add_(1e-3)
    save(tmp_path / "w.safetensors", {f"fire.{k}": v for k, v in m.state_dict().items()})
    changed = runner.invoke(app, ["verify", str(out)])
    assert changed.exit_code == 2 and "is not the one this file was exported with" in changed.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["kerple-power", "--p", "2.5"], "p must list one value per head (12), got 1 values"),
        (
            ["kerple-power", "--heads", "1", "--p", "2.5"],
            "p of the power kernel must be finite with 0 < p <= 2, got 2.5",
        ),
        (
            ["kerple-log", "--heads", "2", "--a", "1", "--a", "0"],
            "a of the log kernel must be finite with a > 0, got 0.0",
        ),
        (["kerple-log", "--variant", "rbf"], "variant must be one of log, power"),
        (["sandwich", "--hidden-size", "63"], "hidden_size must be an even integer >= 2, got 63"),
        (["fire", "--init-c", "0"], "init_c must be a finite number > 0, got 0.0"),
        (["fire", "--mlp-width", "0"], "mlp_width must be an integer >= 1, got 0"),
        (["fire", "--key", "fire"], "--weights FILE and --key NAME go together"),
    ],
)
def test_cli_bad_input(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--seq", "64", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_cli_fire_weights_that_do_not_fit(tmp_path):
    m = trained_reproduction()
    save(tmp_path / "w.pt", {f"fire.{k}": v for k, v in m.state_dict().items()})
    result = runner.invoke(
        app,
        ["fire", "--seq", "64", "--weights", str(tmp_path / "w.pt"), "--key", "fire", "-o", str(tmp_path / "x.onnx")],
    )
    assert result.exit_code == 2 and "has shape (8, 1), want (32, 1) (heads 12, mlp_width 32)" in result.output
    assert len(result.output.strip().splitlines()) == 1
