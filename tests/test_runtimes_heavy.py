"""The heavy optional runtimes (IREE: ~395 MB, its compiler per file; LiteRT: onnx2tf's conversion per
file, from an environment of its own), a marked group not run by default: `python -m pytest -m
heavy_runtimes`. What they do with each op target is measured, not assumed: each target either passes or
is "unsupported" with the compiler's or converter's reason, never a FAIL."""

import numpy as np
import pytest
from conftest import exported, rope_spec

from pe_export.encodings import ENCODINGS
from pe_export.presets import PRESETS
from pe_export.runtimes import RUNTIMES, Skip
from pe_export.spec import OP_NAMES
from pe_export.tools.matrix import Case, table_length
from pe_export.verification.out_of_range import probe_bounds
from pe_export.verification.parity import check

pytestmark = pytest.mark.heavy_runtimes


@pytest.mark.parametrize("op", OP_NAMES)
def test_iree_passes_or_says_why_it_cannot_compile(op):
    spec = rope_spec(op=op)
    try:
        RUNTIMES["iree"](spec, exported(spec))
    except Skip as e:
        pytest.skip(str(e))
    except Exception:
        pass  # an unsupported target: the row below must say so
    (row,) = check(spec, exported(spec), runtimes=("iree",))
    assert row.verdict in ("pass", "unsupported"), row
    assert row.verdict == "pass" and row.worst_ratio < 1 or row.note.startswith(("does not compile", "does not import"))
    if row.verdict == "pass":
        (bounds,) = probe_bounds(spec, exported(spec), runtimes=("iree",))
        assert bounds.verdict in ("loud", "SILENT", "ABORTS") and (bounds.verdict == "loud" or bounds.note)


def llama_rope(op: str, dtype: str):
    """The llama-rope preset at its full 8192 positions."""
    spec = Case("llama-rope", op, dtype, table_length("llama-rope")).spec()
    return spec, exported(spec)


def litert_row(spec, data):
    (row,) = check(spec, data, runtimes=("litert",))
    if row.verdict == "skipped":
        pytest.skip(row.note)
    return row


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_litert_runs_llama_rope_decomposed_within_the_tolerance_and_fails_loudly_out_of_range(dtype):
    spec, data = llama_rope("decomposed", dtype)
    row = litert_row(spec, data)
    assert row.verdict == "pass" and row.worst_ratio < 1, row.note
    assert (
        row.provider.startswith("LiteRT") and f"({'float16' if dtype == 'fp16' else 'float32'} .tflite)" in row.provider
    )
    (bounds,) = probe_bounds(spec, data, runtimes=("litert",))
    assert bounds.verdict == "loud", bounds


@pytest.mark.parametrize("preset", ["t5-bias", "shaw"])
def test_litert_runs_graphs_with_rank_1_position_guards(preset):
    """common.guard's Where replaces bad positions by a tensor, not a scalar: onnx2tf writes a rank-1 Where
    with a scalar as TFLite's SELECT, which does not broadcast, and LiteRT could not prepare it."""
    spec = Case(preset, "decomposed", "fp32", 256).spec()
    row = litert_row(spec, exported(spec))
    assert row.verdict == "pass" and row.worst_ratio < 1, row.note
    (bounds,) = probe_bounds(spec, exported(spec), runtimes=("litert",))
    assert bounds.verdict == "loud", bounds


def causal_bias_presets() -> list[str]:
    """Every bias preset whose bias is also the causal mask (-inf for a key after its query), read from
    its float64 reference."""
    later = {"query_positions": np.array([0]), "key_positions": np.array([0, 1])}
    return [
        name
        for name, preset in PRESETS.items()
        if (encoding := ENCODINGS.get(preset.encoding)).kind == "bias"
        and np.isneginf(encoding.reference(Case(name, "decomposed", "fp32", 256).spec(), later)).any()
    ]


# onnx2tf's _float16 .tflite computes FIRE's float32 MLP in float16 (its DIV, MUL, BATCH_MATMUL are float16):
# finite, but past the bound of a graph that rounds to fp16 once.
FP16_IN_THE_MIDDLE = pytest.mark.xfail(strict=True, reason="the float16 .tflite computes FIRE's float32 MLP in float16")


@pytest.mark.parametrize(
    "preset, dtype",
    [
        pytest.param(preset, dtype, marks=[FP16_IN_THE_MIDDLE] if (preset, dtype) == ("fire", "fp16") else [])
        for preset in causal_bias_presets()
        for dtype in ("fp32", "fp16")
    ],
)
def test_litert_runs_causal_biases_with_their_minus_inf_mask(preset, dtype):
    """common.mask_later_keys adds a (Q, K) mask read from [0, -inf]: the Where it replaces had a (Q, K)
    condition on an (H, Q, K) bias, which onnx2tf writes as cond * x + (1 - cond) * y, and 0 * -inf is NaN."""
    spec = Case(preset, "decomposed", dtype, 256).spec()
    row = litert_row(spec, exported(spec))
    assert row.verdict == "pass" and row.worst_ratio < 1, row.note
    (bounds,) = probe_bounds(spec, exported(spec), runtimes=("litert",))
    assert bounds.verdict == "loud", bounds


@pytest.mark.parametrize(
    "op, dtype, reason",
    [
        (
            "onnx",
            "fp32",
            "RotaryEmbedding (onnx2tf leaves it a TFLite custom op",
        ),  # its builtin path takes no position_ids
        (
            "ort",
            "fp32",
            "RotaryEmbedding (onnx2tf leaves it a TFLite custom op",
        ),  # com.microsoft's: onnx2tf reads the name only
        ("decomposed", "bf16", "NotImplementedError: Unsupported ONNX dtype in flatbuffer_direct: elem_type=16"),
    ],
)
def test_litert_a_target_that_does_not_convert_is_a_row_not_a_crash(op, dtype, reason):
    row = litert_row(*llama_rope(op, dtype))
    assert row.verdict == "unsupported" and row.note.startswith(f"does not convert: {reason}"), row


@pytest.mark.parametrize(
    "preset, dtype, reason",
    [
        (
            "transformer-xl",
            "fp32",
            "does not run: XNNPack delegate failed to reshape runtime",
        ),  # the converted shift's shapes
        ("xpos", "fp16", "does not run: Unsupported datatype for sign output: FLOAT16"),  # LiteRT's SIGN has no float16
    ],
)
def test_litert_a_graph_that_converts_but_does_not_run_is_a_row_not_a_failure(preset, dtype, reason):
    spec = Case(preset, "decomposed", dtype, 256).spec()
    row = litert_row(spec, exported(spec))
    assert row.verdict == "unsupported" and row.note.startswith(reason), row


def tiny_llama_rewritten(tmp_path, op: str):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import rewrite_models as rm

    from pe_export.rewriter import apply as api

    model, cfg = rm.build(rm.BY_NAME["llama"])
    path, config = rm.export(model, tmp_path / "model.onnx"), rm.save_config(cfg, tmp_path)
    original, result = api.load(path), api.rewrite(api.load(path), config, op=op)
    api.prune(result.model)
    return original, result


@pytest.mark.parametrize("op", ["tables", "decomposed"])
def test_rewrite_sites_verified_on_litert(op, tmp_path):
    """`pe-export rewrite --runtimes litert`: the rewritten tiny Llama converts, and its cos/sin (tables) or
    rotated q/k (decomposed) agree with the float64 reference up to the table's end (32767)."""
    from pe_export.rewriter import checks as verify

    original, result = tiny_llama_rewritten(tmp_path, op)
    rows = verify.check_sites(original, result.model, result.sites, ("litert",))
    if rows[0].verdict == "skipped":
        pytest.skip(rows[0].note)
    assert rows and all(r.verdict == "pass" for r in rows), rows
    assert rows[0].positions[-1] == 32767


def test_litert_gets_the_whole_transformers_llama_wrong_original_and_rewritten_alike(tmp_path):
    """A finding, kept as a test that fails once LiteRT or onnx2tf is fixed: the tiny Llama's logits on
    LiteRT differ from ORT CPU's by ~0.4-0.7 (logits of size ~5) for the ORIGINAL export as for the
    rewritten one, so a whole-model row on litert compares two wrong answers. (Measured: original 0.38,
    rewritten --op decomposed 0.50 at batch 1, positions 0-15.) The per-site rows above hold."""
    import numpy as np

    from pe_export.rewriter import checks as verify
    from pe_export.runtimes import GRAPH_RUNTIMES

    original, _ = tiny_llama_rewritten(tmp_path, "tables")
    model_bytes, names, _ = verify.with_outputs(original, [])
    feed = verify.feeds(original, np.arange(16), 1)
    try:
        litert, _ = GRAPH_RUNTIMES["litert"](model_bytes)
    except Skip as e:
        pytest.skip(str(e))
    ort, _ = GRAPH_RUNTIMES["ort-cpu"](model_bytes)
    diff = np.abs(litert(feed)[0] - ort(feed)[0]).max()
    assert diff > 1e-2, (
        f"LiteRT now agrees with ORT on the whole model ({diff:.1e}): drop this test and check whole-model rows"
    )
