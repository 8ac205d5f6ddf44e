"""Transformer-XL relative attention: the exported graph, the torch module and the float64 NumPy reference
against a float64 transcription of the published implementation (transformers 5.x no longer ships
Transformer-XL), with the same seeded weights; clamp, decode over a memory, the K = max_positions end,
and the K > max_positions / K < Q failures."""

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_verified, exported, ort_cpu_session

from pe_export.encodings import ENCODINGS
from pe_export.encodings.transformer_xl import TransformerXLParams, learned, sinusoid
from pe_export.spec import Spec
from pe_export.verification.tolerances import bound

# ------------------------------------------------------------------------------------------------
# The oracle: kimiyoung/transformer-xl pytorch/mem_transformer.py at commit
# 81b1b1955b5729b311e1548998eb2a89cb528178, transcribed line for line in float64:
# `PositionalEmbedding`, `RelMultiHeadAttn._rel_shift`, the attention part of
# `RelPartialLearnableMultiHeadAttn.forward` (from `klen = w_head_k.size(0)` to `attn_vec`; the
# qkv_net / o_net projections and the layer norm are outside the encoding), and from
# `MemTransformerLM._forward` (same_length False, attn_type 0) how `dec_attn_mask` and `pos_seq` are built.
# Three changes, all for a float64 oracle on today's torch, each marked where it is made.


class PositionalEmbedding(torch.nn.Module):
    def __init__(self, demb):
        super().__init__()

        self.demb = demb

        inv_freq = 1 / (10000 ** (torch.arange(0.0, demb, 2.0, dtype=torch.float64) / demb))  # float64 here
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, pos_seq, bsz=None):
        sinusoid_inp = torch.ger(pos_seq, self.inv_freq)
        pos_emb = torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)

        if bsz is not None:
            return pos_emb[:, None, :].expand(-1, bsz, -1)
        else:
            return pos_emb[:, None, :]


def _rel_shift(x, zero_triu=False):
    zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), device=x.device, dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1)

    x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])

    x = x_padded[1:].view_as(x)

    if zero_triu:
        ones = torch.ones((x.size(0), x.size(1)))
        x = x * torch.tril(ones, x.size(1) - x.size(0))[:, :, None, None]

    return x


def txl_attention(p: TransformerXLParams, query, key, value):
    """(B, H, Q|K, D) arrays -> float64 (B, H, Q, D), through TXL's own code in its (len, bsz, n_head,
    d_head) layout."""
    w = {k: torch.from_numpy(v) for k, v in learned(p).items()}
    r_w_bias, r_r_bias = w["r_w_bias"], w["r_r_bias"]
    r_net = torch.nn.Linear(p.d_model, p.heads * p.head_dim, bias=False).double()
    with torch.no_grad():
        r_net.weight.copy_(w["r_net"])
    pos_emb_module = PositionalEmbedding(p.d_model)
    n_head, d_head, scale = p.heads, p.head_dim, 1 / (p.head_dim**0.5)
    # (B, H, L, D) -> (L, B, H, D)
    w_head_q, w_head_k, w_head_v = (
        torch.from_numpy(np.asarray(a, dtype=np.float64)).permute(2, 0, 1, 3) for a in (query, key, value)
    )
    qlen = w_head_q.size(0)

    with torch.no_grad():
        # MemTransformerLM._forward
        klen = w_head_k.size(0)
        mlen = klen - qlen
        # .byte() in the original: today's masked_fill takes bool masks only
        dec_attn_mask = torch.triu(torch.ones(qlen, klen, dtype=torch.float64), diagonal=1 + mlen).bool()[:, :, None]
        pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=torch.float64)
        if p.clamp_len > 0:
            pos_seq.clamp_(max=p.clamp_len)
        r = pos_emb_module(pos_seq)
        rlen = r.size(0)

        # RelPartialLearnableMultiHeadAttn.forward
        r_head_k = r_net(r)
        r_head_k = r_head_k.view(rlen, n_head, d_head)  # qlen x n_head x d_head

        #### compute attention score
        rw_head_q = w_head_q + r_w_bias  # qlen x bsz x n_head x d_head
        AC = torch.einsum("ibnd,jbnd->ijbn", (rw_head_q, w_head_k))  # qlen x klen x bsz x n_head

        rr_head_q = w_head_q + r_r_bias
        BD = torch.einsum("ibnd,jnd->ijbn", (rr_head_q, r_head_k))  # qlen x klen x bsz x n_head
        BD = _rel_shift(BD)

        # [qlen x klen x bsz x n_head]
        attn_score = AC + BD
        attn_score.mul_(scale)

        #### compute attention probability
        # The original's `attn_score.float()` (there for fp16 training) would round this float64 oracle to float32.
        attn_mask = dec_attn_mask
        if attn_mask is not None and attn_mask.any().item():
            if attn_mask.dim() == 2:
                attn_score = attn_score.masked_fill(attn_mask[None, :, :, None], -float("inf")).type_as(attn_score)
            elif attn_mask.dim() == 3:
                attn_score = attn_score.masked_fill(attn_mask[:, :, :, None], -float("inf")).type_as(attn_score)

        # [qlen x klen x bsz x n_head]
        attn_prob = F.softmax(attn_score, dim=1)

        #### compute attention vector
        attn_vec = torch.einsum("ijbn,jbnd->ibnd", (attn_prob, w_head_v))  # qlen x bsz x n_head x d_head
    return attn_vec.permute(1, 2, 0, 3).numpy()


# ------------------------------------------------------------------------------------------------

SMALL = dict(heads=2, head_dim=16, d_model=32, clamp_len=20, mem_len=64, max_positions=128, weights_seed=3)
NO_CLAMP = dict(heads=3, head_dim=8, d_model=24, clamp_len=0, max_positions=64)
WT103 = dict(heads=16, head_dim=64, d_model=1024, clamp_len=1000, mem_len=1600, max_positions=1728)  # §9, tgt_len 128


def txl_spec(dtype="fp32", **params):
    return Spec(encoding="transformer-xl", params=params, op="decomposed", opset=17, dtype=dtype)


def probes(spec):
    return ENCODINGS.get("transformer-xl").probes(spec, np.random.default_rng(0), 2)


def reference(spec, inputs):
    return ENCODINGS.get("transformer-xl").reference(spec, inputs)


# ------------------------------------------------------------------------------------------------
# Parity of the exported graph (ORT CPU, ReferenceEvaluator, torch) with the float64 reference


@pytest.mark.parametrize("params", [SMALL, NO_CLAMP], ids=["clamp20", "noclamp"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_exported_graph_matches_reference(params, dtype):
    assert_verified(txl_spec(dtype, **params))


def test_probes_cover_decode_the_table_end_and_the_clamp():
    p = TransformerXLParams(**SMALL)
    shapes = [(x["query"].shape[2], x["key"].shape[2]) for _, x in probes(txl_spec(**SMALL))]
    assert any(q == 1 < k for q, k in shapes)  # decode over a memory
    assert any(1 < q < k for q, k in shapes)  # a segment over a memory
    assert any(q == k for q, k in shapes)  # no memory
    assert any(k == p.max_positions for _, k in shapes)  # every distance of the table
    assert any(k > p.clamp_len + 1 for _, k in shapes)  # distances past clamp_len


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_ort_cpu_matches_transformer_xl(dtype):
    spec = txl_spec(dtype, **SMALL)
    sess = ort_cpu_session(exported(spec))
    assert sess.get_providers()[0] == "CPUExecutionProvider"
    for name, inputs in probes(spec):
        got = sess.run(None, inputs)[0].astype(np.float64)
        want = txl_attention(TransformerXLParams(**SMALL), inputs["query"], inputs["key"], inputs["value"])
        err = np.abs(got - want)
        assert np.all(err <= bound(spec, inputs)), f"{name}: max abs error {err.max():.3g}"


# ------------------------------------------------------------------------------------------------
# The torch module and the NumPy reference against the published implementation


@pytest.mark.parametrize("params", [SMALL, NO_CLAMP], ids=["clamp20", "noclamp"])
def test_reference_matches_transformer_xl(params):
    spec = txl_spec(**params)
    for name, inputs in probes(spec):
        want = txl_attention(TransformerXLParams(**params), inputs["query"], inputs["key"], inputs["value"])
        np.testing.assert_allclose(reference(spec, inputs), want, rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("params", [SMALL, NO_CLAMP], ids=["clamp20", "noclamp"])
def test_torch_module_matches_transformer_xl(params):
    spec = txl_spec(**params)
    module = ENCODINGS.get("transformer-xl").module(spec)
    for name, inputs in probes(spec):
        with torch.no_grad():
            got = module(*(torch.from_numpy(inputs[n]) for n in ("query", "key", "value"))).double().numpy()
        want = txl_attention(TransformerXLParams(**params), inputs["query"], inputs["key"], inputs["value"])
        err = np.abs(got - want)
        assert np.all(err <= bound(spec, inputs)), f"{name}: max abs error {err.max():.3g}"


def test_sinusoid_is_the_concatenated_layout():
    # d_model 4: inv_freq = [1, 1/100]; R[d] = [sin(d), sin(d/100), cos(d), cos(d/100)]
    want = [[0, 0, 1, 1], [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)]]
    np.testing.assert_allclose(sinusoid(4, np.array([0, 3])), want, atol=1e-15)


def test_clamp_changes_only_distances_past_it():
    p = TransformerXLParams(**SMALL)
    spec, unclamped = txl_spec(**SMALL), txl_spec(**{**SMALL, "clamp_len": 0})
    wide = txl_spec(**{**SMALL, "clamp_len": p.max_positions - 1})  # no distance reaches it
    for name, inputs in probes(spec):
        K = inputs["key"].shape[2]
        # exact: the same arithmetic on the same shapes (a clamp that no distance reaches changes no value)
        np.testing.assert_array_equal(reference(wide, inputs), reference(unclamped, inputs))
        same = np.allclose(reference(spec, inputs), reference(unclamped, inputs), rtol=0, atol=1e-12)
        assert same == (K <= p.clamp_len + 1), name  # the clamp acts exactly when some distance exceeds it


def test_graph_holds_the_shift_and_a_clamped_table():
    model = onnx.load_from_string(exported(txl_spec(**SMALL)))
    ops = {n.op_type for n in model.graph.node}
    assert {"Concat", "Reshape", "Slice", "Gather"} <= ops and not ops & {"If", "Loop", "Scan"}
    tables = [tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 3]
    assert (SMALL["clamp_len"] + 1, 2, 16) in tables  # W_r R for distances 0..clamp_len


# ------------------------------------------------------------------------------------------------
# Out of range: K > max_positions, K < Q


def bad_inputs(Q, K, H=2, D=16):
    rng = np.random.default_rng(1)
    return {
        n: rng.standard_normal((1, H, L, D)).astype(np.float32) for n, L in (("query", Q), ("key", K), ("value", K))
    }


BAD = [(4, SMALL["max_positions"] + 1), (SMALL["max_positions"] + 1,) * 2, (5, 4), (2, 1)]


@pytest.mark.parametrize("Q,K", BAD, ids=["long-memory", "long-prefill", "short-keys", "short-keys-1"])
def test_out_of_range_fails_everywhere(Q, K):
    spec = txl_spec(**SMALL)
    inputs = bad_inputs(Q, K)
    with pytest.raises(Exception, match="(?i)out of data bounds|out of range|out of bounds|invalid"):
        ort_cpu_session(exported(spec)).run(None, inputs)
    from onnx.reference import ReferenceEvaluator

    with pytest.raises(IndexError):
        ReferenceEvaluator(onnx.load_from_string(exported(spec))).run(None, inputs)
    with pytest.raises(IndexError, match="out of range|shorter"):
        reference(spec, inputs)
    with pytest.raises((IndexError, RuntimeError)):
        ENCODINGS.get("transformer-xl").module(spec)(*(torch.from_numpy(inputs[n]) for n in ("query", "key", "value")))


def test_the_largest_valid_lengths_run():
    spec = txl_spec(**SMALL)
    P = SMALL["max_positions"]
    for Q, K in ((P, P), (1, P), (1, 1)):
        inputs = bad_inputs(Q, K)
        got = ort_cpu_session(exported(spec)).run(None, inputs)[0]
        assert np.all(np.abs(got - reference(spec, inputs)) <= bound(spec, inputs))


# ------------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(heads=0), "heads must be an integer >= 1, got 0"),
        (dict(head_dim=-1), "head_dim must be an integer >= 1, got -1"),
        (dict(d_model=0), "d_model must be an integer >= 2, got 0"),
        (dict(d_model=33), "d_model must be even"),
        (dict(max_positions=0), "max_positions must be an integer >= 1, got 0"),
        (dict(clamp_len=-1), "clamp_len must be an integer >= 0, got -1"),
        (dict(mem_len=-5), "mem_len must be an integer >= 0, got -5"),
        (dict(heads=2.0), "heads must be an integer >= 1, got 2.0"),
        (dict(max_positions=True), "max_positions must be an integer"),
        (dict(same_length=True), "same_length=True .* is not supported"),
        (dict(weights="w.safetensors", key="r"), "seeded random weights only"),
        (dict(weights_seed=-1), "weights_seed must be an integer >= 0"),
    ],
)
def test_bad_parameters_raise(change, message):
    with pytest.raises(ValueError, match=message):
        TransformerXLParams(**{**SMALL, **change})


def test_table_rows():
    from pe_export.encodings.transformer_xl import rows

    assert rows(TransformerXLParams(**SMALL)) == 21  # clamp_len + 1
    assert rows(TransformerXLParams(**NO_CLAMP)) == 64  # max_positions
    assert rows(TransformerXLParams(**{**SMALL, "clamp_len": 500})) == 128  # the clamp is never reached
    assert rows(TransformerXLParams(**WT103)) == 1001
