"""Absolute encodings (sinusoidal, learned) against transformers 5.23 and the weights-file reader."""

import numpy as np
import pytest
import torch

from pe_export import weights
from pe_export.encodings import sinusoidal
from pe_export.encodings.learned import LearnedParams, table
from pe_export.encodings.sinusoidal import SinusoidalParams

EPS32 = 2.0**-23


def test_interleaved_is_distilbert():
    from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings

    P, D = 2048, 512
    want = _create_sinusoidal_embeddings(P, D, torch.empty(P, D, dtype=torch.float64)).numpy()  # float32 values
    got = sinusoidal.table(SinusoidalParams(dim=D, max_positions=P))
    assert np.max(np.abs(got - want)) <= EPS32 / 2  # transformers rounds the float64 values to float32 once


def test_concat_is_xlnet_and_transformer_xl():
    from transformers.models.xlnet.modeling_xlnet import XLNetModel

    P, D = 1728, 1024
    inv_freq = 1 / torch.pow(10000, torch.arange(0, D, 2.0, dtype=torch.float64) / D)
    want = XLNetModel.positional_embedding(torch.arange(P, dtype=torch.float64), inv_freq)[:, 0].numpy()
    got = sinusoidal.table(SinusoidalParams(dim=D, layout_variant="concat", max_positions=P))
    assert np.max(np.abs(got - want)) < 1e-12  # both float64


@pytest.mark.parametrize("dim", [64, 63])
def test_tensor2tensor_is_fairseq_m2m100(dim):
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    P = 1024
    want = M2M100SinusoidalPositionalEmbedding.get_embedding(P, dim).double().numpy()  # float32 angles
    got = sinusoidal.table(SinusoidalParams(dim=dim, layout_variant="tensor2tensor", max_positions=P))
    # transformers forms the angles in float32: each is off by at most ~2 eps32 relative, so cos/sin by
    # at most 2 eps32 * angle (angles reach P - 1 radians), plus float32 rounding of the result.
    assert np.max(np.abs(got - want)) <= 2 * EPS32 * (P - 1) + EPS32
    if dim % 2:
        assert np.all(got[:, -1] == 0)


def test_paper_values_by_hand():
    t = sinusoidal.table(SinusoidalParams(dim=4, max_positions=3))
    # PE(1, 0) = sin(1), PE(1, 1) = cos(1), PE(1, 2) = sin(1 / 10000^(2/4)) = sin(0.01)
    assert t[1].tolist() == pytest.approx([np.sin(1.0), np.cos(1.0), np.sin(0.01), np.cos(0.01)], abs=1e-15)
    assert t[0].tolist() == [0.0, 1.0, 0.0, 1.0]  # exact: sin(0) and cos(0)


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(dim=7), "dim must be even"),
        (dict(dim=2, layout_variant="tensor2tensor"), "dim must be >= 4"),
        (dict(dim=8, layout_variant="paper"), "layout_variant must be one of"),
        (dict(dim=8, base=1.0), "base must be"),
        (dict(dim=8, max_positions=0), "max_positions (--seq) must be >= 1"),
    ],
)
def test_sinusoidal_rejects(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SinusoidalParams(**params)


# --------------------------------------------------------------------------------------------------
# learned


def test_learned_is_bert_and_gpt2_with_the_same_weights(tmp_path):
    from transformers import BertConfig, GPT2Config
    from transformers.models.bert.modeling_bert import BertEmbeddings
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    p = LearnedParams(dim=32, rows=64, weights_seed=3)
    t = table(p)
    ids = torch.tensor([[0, 5, 63], [62, 1, 2]])
    bert = BertEmbeddings(BertConfig(hidden_size=32, max_position_embeddings=64, vocab_size=10)).eval()
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_positions=64, n_layer=1, n_head=2, vocab_size=10)).eval()
    with torch.no_grad():
        bert.position_embeddings.weight.copy_(torch.from_numpy(t))
        gpt2.wpe.weight.copy_(torch.from_numpy(t))
        want_bert = bert.position_embeddings(ids).double().numpy()
        want_gpt2 = gpt2.wpe(ids).double().numpy()
    from pe_export.encodings import ENCODINGS
    from pe_export.spec import Spec

    got = ENCODINGS.get("learned").reference(
        Spec(encoding="learned", params={"dim": 32, "rows": 64, "weights_seed": 3}), {"position_ids": ids.numpy()}
    )
    # the models hold float32 weights: one float32 rounding of each entry
    assert np.max(np.abs(got - want_bert)) <= EPS32 * np.abs(t).max()
    assert np.max(np.abs(got - want_gpt2)) <= EPS32 * np.abs(t).max()


def test_seeded_weights_differ_by_seed_and_repeat():
    a, b = table(LearnedParams(dim=8, rows=16)), table(LearnedParams(dim=8, rows=16, weights_seed=1))
    assert not np.allclose(a, b) and np.array_equal(a, table(LearnedParams(dim=8, rows=16)))  # exact: same draws


def test_safetensors_and_state_dict_read_the_same_tensor(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(20, 6, dtype=torch.float32)
    save_file({"wpe.weight": t, "other": torch.zeros(2)}, tmp_path / "w.safetensors")
    torch.save({"wpe.weight": t, "step": 3}, tmp_path / "w.pt")
    for path in ("w.safetensors", "w.pt"):
        got = weights.load(weights.LearnedWeights(weights=str(tmp_path / path), key="wpe.weight"))
        assert np.array_equal(got, t.double().numpy())  # exact: a cast
    save_file({"x": t.to(torch.bfloat16), "y": t.half()}, tmp_path / "b.safetensors")
    for key, dt in (("x", torch.bfloat16), ("y", torch.float16)):
        got = weights.load(weights.LearnedWeights(weights=str(tmp_path / "b.safetensors"), key=key))
        assert np.array_equal(got, t.to(dt).double().numpy())  # exact: casts


class Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize(
    "make,key,message",
    [
        (None, "k", "does not exist"),
        (lambda p: p.write_bytes(b"not a tensor file at all"), "k", "is not a .safetensors file or a torch state dict"),
        (lambda p: torch.save({"k": Evil()}, p), "k", "is not a .safetensors file or a torch state dict"),
        (lambda p: torch.save([torch.zeros(2)], p), "k", "holds a list, not a state dict"),
        (lambda p: torch.save({"a": torch.zeros(2)}, p), "k", "has no tensor 'k'; it has: a"),
        (lambda p: torch.save({"k": torch.tensor([1.0, float("nan")])}, p), "k", "NaN or infinite"),
    ],
)
def test_bad_weight_files(tmp_path, make, key, message):
    path = tmp_path / "w.pt"
    if make:
        make(path)
    with pytest.raises(ValueError, match=message):
        weights.load(weights.LearnedWeights(weights=str(path), key=key))


def test_bad_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a valid .safetensors file"):
        weights.load(weights.LearnedWeights(weights=str(path), key="k"))


def test_wrong_shape_and_changed_tensor(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"k": torch.zeros(10, 4)}, path)
    with pytest.raises(ValueError, match=r"has shape \(10, 4\), want \(10, 8\)"):
        table(LearnedParams(dim=8, rows=10, weights=str(path), key="k"))
    p = LearnedParams(dim=4, rows=10, weights=str(path), key="k", weights_sha256=weights.digest(np.zeros((10, 4))))
    assert table(p).shape == (10, 4)
    torch.save({"k": torch.ones(10, 4)}, path)
    with pytest.raises(ValueError, match="is not the one this file was exported with"):
        table(p)


@pytest.mark.parametrize(
    "params,message",
    [
        (dict(dim=0, rows=4), "dim must be an integer >= 1"),
        (dict(dim=4, rows=4, max_positions=5), "at most the table's 4 rows"),
        (dict(dim=4, rows=4, weights="w.pt"), "--weights FILE and --key NAME go together"),
        (dict(dim=4, rows=4, weights_seed=-1), "weights_seed must be"),
    ],
)
def test_learned_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        LearnedParams(**params)
