"""`pe-export rewrite` on models too large for one protobuf (issue 19, parts 1 and 6), at tiny size: the
external-data threshold and the 2 GiB limit are forced small, so the route a real Llama takes (copies
written beside the model's external data and given to the runtimes by path, one runtime at a time) is
the one these tests run. Expected values: the same checks by the in-memory route on the same model, and
the verdicts against pe-export's float64 reference; time and memory are in benchmarks/realsize.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import rewrite_models as rm  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

THRESHOLD = 1000  # bytes: every tiny model is "large"


def cli(*args):
    from pe_export.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """(model.onnx with every weight in model.onnx.data beside it, config.json), a tiny Llama."""
    import onnx_ir as ir

    folder = tmp_path_factory.mktemp("external")
    model, cfg = rm.build(rm.BY_NAME["llama"])
    plain = rm.export(model, folder / "plain.onnx")
    ir.save(ir.load(plain), folder / "model.onnx", external_data="model.onnx.data")
    plain.unlink()
    return folder / "model.onnx", rm.save_config(cfg, folder)


@pytest.fixture
def small_threshold(monkeypatch):
    """A forced small threshold; and a protobuf of all weights refused, as over 2 GiB it is."""
    from pe_export.rewriter import copies

    monkeypatch.setattr("pe_export.files.EXTERNAL_DATA_THRESHOLD", THRESHOLD)
    monkeypatch.setattr(copies, "MAX_PROTO", 0)


def test_large_model_verified_by_path_one_runtime_at_a_time(external, small_threshold, monkeypatch, tmp_path):
    import onnx

    from pe_export.rewriter import checks, rewrite_and_verify
    from pe_export.runtimes import worker

    path, config = external
    seen = []  # (runtime, what it was given, whether that reads the model's weights, other workers holding them)
    holds = {}  # runtime -> whether its worker holds the model's weights
    load = worker.load

    def reads_weights(model) -> bool:
        proto = onnx.load(model, load_external_data=False)
        return any(e.value == f"{path.name}.data" for t in proto.graph.initializer for e in t.external_data)

    def spy(name, adapter, spec, model, *args, **kwargs):
        weights = isinstance(model, str) and reads_weights(model)
        others = [w.name for w in worker._POOL.values() if w.alive() and w.name != name and holds.get(w.name)]
        seen.append((name, type(model).__name__, weights, others))
        holds[name] = weights
        return load(name, adapter, spec, model, *args, **kwargs)

    worker.shutdown()
    monkeypatch.setattr(worker, "load", spy)
    run = rewrite_and_verify(path, config, output=tmp_path / "r.onnx")
    rows = [*run.site_rows, *run.whole_rows]
    assert run.verdict == "pass" and rows and all(r.verdict == "pass" for r in rows), rows
    assert {r.runtime for r in run.whole_rows} == {"ort-cpu", "ort-cpu-noopt"}
    site = run.site_rows[0]
    assert site.rewritten_error[-1] <= site.bound < site.original_error[-1], site  # the fix, at the last row
    assert seen and all(kind == "str" for _, kind, _, _ in seen), seen  # paths, never bytes
    # One load with the weights per runtime (both models in one graph), and never two runtimes holding them.
    assert sorted(name for name, _, weights, _ in seen if weights) == ["ort-cpu", "ort-cpu-noopt"], seen
    assert not any(others for _, _, weights, others in seen if weights), seen
    assert (tmp_path / "r.onnx.data").is_file()
    assert not list(path.parent.glob(".pe-export-checks-*")), "the check copies were not removed"
    assert not list(tmp_path.glob(".r.onnx*")), "the output's temporary files were not removed"
    # The same checks by bytes (the in-memory route: weights read into memory, the threshold back up).
    import onnx_ir as ir

    from pe_export.rewriter import apply

    monkeypatch.setattr("pe_export.files.EXTERNAL_DATA_THRESHOLD", 2**30)
    original = ir.external_data.load_to_model(apply.load(path))
    result = apply.rewrite(original, config)
    seen.clear()
    in_memory = checks.check_sites(original, result.model, result.sites)
    assert seen and all(kind == "bytes" for _, kind, _, _ in seen), seen
    assert all(r.verdict == "pass" for r in in_memory)
    np.testing.assert_allclose(
        [r.rewritten_error for r in run.site_rows], [r.rewritten_error for r in in_memory], rtol=1e-6, atol=0
    )


def test_copies_by_bytes_and_by_path_compute_the_same(external, small_threshold):
    """A site copy pruned to the cos/sin, given by path (reading the model's external data through the
    hard link) and given as bytes (its weights read in), on ORT: the same values."""
    import onnx_ir as ir
    import onnxruntime as ort

    from pe_export.rewriter import apply, checks, copies

    path, config = external
    result = apply.rewrite(path, config)
    site = result.sites[0]
    feed = checks.feeds(result.model, np.arange(8, dtype=np.int64))
    with copies.Copies(result.model) as c:
        file, names, inputs = c.with_outputs(result.model, [site.cos, site.sin], only=True)
        assert isinstance(file, str) and names == [site.cos, site.sin] and inputs == ["position_ids"]
        feed = {k: feed[k] for k in inputs}
        assert Path(file).parent.parent == path.parent  # beside the model's data: ORT reads it there
        by_path = ort.InferenceSession(file, providers=["CPUExecutionProvider"]).run(None, feed)
        folder = Path(file).parent
    assert not folder.exists()
    copies.MAX_PROTO = 2**31  # undo the fixture's refusal for the bytes
    try:
        data = copies.as_bytes(result.model, [site.cos, site.sin], only=True).model
    finally:
        copies.MAX_PROTO = 0
    by_bytes = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(by_path, by_bytes):
        np.testing.assert_array_equal(a, b)  # the same graph on the same data: no arithmetic differs
    assert ir.load(path).graph  # the model itself is untouched


def test_the_two_models_run_as_one_graph_with_the_same_outputs(external, small_threshold):
    """`pair.joined`: the rewritten's unchanged nodes are the original's, its changed ones are added
    renamed, the weights are not repeated; the joined graph gives each model's outputs exactly as each
    model alone does (ONNX Runtime without graph optimisation: the same kernels on the same values)."""
    import onnx
    import onnxruntime as ort

    from pe_export.rewriter import apply, checks, copies, pair

    path, config = external
    original = apply.load(path)
    result = apply.rewrite(original, config)
    apply.prune(result.model)
    both = pair.joined(original, result.model, [])
    po, pn = ir_proto(original), ir_proto(result.model)
    assert both.original == ["logits"] and both.rewritten == ["logits" + pair.SUFFIX] and both.names == ["logits"]
    added = [n for n in both.proto.graph.node if n.name.endswith(pair.SUFFIX)]
    assert 0 < len(added) < len(pn.graph.node) and len(both.proto.graph.node) == len(po.graph.node) + len(added)
    weights = {t.name for t in po.graph.initializer}
    assert not any(
        t.name.endswith(pair.SUFFIX) and t.name[: -len(pair.SUFFIX)] in weights for t in both.proto.graph.initializer
    )
    other = result.model.clone()
    other.graph.opset_imports[""] += 1
    assert pair.joined(original, other, []) is None  # one graph cannot import two versions of an opset
    feed = checks.feeds(result.model, np.arange(16, dtype=np.int64), batch=2)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with copies.Copies(original, result.model) as c:
        joint = c.joined(original, result.model, [])
        alone = c.with_outputs(original, []), c.with_outputs(result.model, [])
        run = lambda m, names: dict(  # noqa: E731
            zip(names, ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]).run(names, feed))
        )
        got = run(joint.model, joint.outputs)
        np.testing.assert_array_equal(got["logits"], run(alone[0].model, ["logits"])["logits"])
        np.testing.assert_array_equal(got["logits" + pair.SUFFIX], run(alone[1].model, ["logits"])["logits"])
        assert c.holds_weights(joint.model) and onnx.load(joint.model, load_external_data=False).graph.node


def ir_proto(model):
    import onnx_ir as ir

    return ir.to_proto(model)


def test_a_runtime_that_cannot_run_the_original_says_so_on_the_large_route(external, small_threshold, monkeypatch):
    """Where the joined graph does not run, each model runs alone: the row says the original is what
    this runtime cannot run (its Cos), as on the in-memory route."""
    import fake_runtimes

    from pe_export.rewriter import apply, checks
    from pe_export.runtimes import GRAPH_RUNTIMES

    monkeypatch.setitem(GRAPH_RUNTIMES, "no-cos", fake_runtimes.no_cos_graph)
    path, config = external
    original = apply.load(path)
    result = apply.rewrite(original, config)
    apply.prune(result.model)
    (whole,) = checks.check_whole(original, result.model, ("no-cos",))
    assert whole.verdict == "unsupported" and whole.note == "original: no Cos here (fake)", whole
    sites = checks.check_sites(original, result.model, result.sites, ("no-cos",))
    assert sites and all(r.verdict == "pass" and r.original_error[0] is None for r in sites), sites


def test_the_output_keeps_the_original_layout_and_its_weights(external, small_threshold, tmp_path):
    """A large model's output: the original's external data copied as it lay (each tensor at its old
    offset modulo ALIGN, as memory mapping needs), the rewrite's tables after it; the model
    written from it computes what the rewritten model in memory computes."""
    import onnx_ir as ir
    import onnxruntime as ort

    from pe_export.rewriter import apply, output

    path, config = external
    original = apply.load(path)
    result = apply.rewrite(original, config, output=tmp_path / "r.onnx")
    written = ir.load(tmp_path / "r.onnx")
    assert not list(tmp_path.glob(".r.onnx*")), "temporary files left"
    runs = output.layout(original)
    assert runs and all((r.at - r.start) % output.ALIGN == 0 for r in runs), runs
    assert all(a.at + a.end - a.start <= b.at for a, b in zip(runs, runs[1:])), runs  # in order, apart
    for name, value in original.graph.initializers.items():
        t = value.const_value
        if name in written.graph.initializers and isinstance(t, ir.ExternalTensor) and t.nbytes > output.THRESHOLD:
            w = written.graph.initializers[name].const_value
            assert isinstance(w, ir.ExternalTensor) and w.location == "r.onnx.data", name
            assert (w.offset - t.offset) % output.ALIGN == 0, name
            np.testing.assert_array_equal(w.numpy(), t.numpy())
    tables = [v.const_value for n, v in written.graph.initializers.items() if n.startswith("pe_export.rope")]
    end = max(r.at + r.end - r.start for r in runs)
    assert tables and all(t.offset >= end for t in tables)
    feed = {"input_ids": np.zeros((1, 8), np.int64), "position_ids": np.arange(8, dtype=np.int64)[None]}
    in_memory = ir.external_data.load_to_model(result.model)
    expected = ort.InferenceSession(ir.to_proto(in_memory).SerializeToString()).run(None, feed)
    got = ort.InferenceSession(str(tmp_path / "r.onnx")).run(None, feed)
    np.testing.assert_array_equal(got[0], expected[0])


def test_a_refused_rewrite_leaves_no_file(external, small_threshold, tmp_path):
    """The copy of the external data starts before the rewrite: a config the graph disagrees with
    (exit 2) stops it and removes it."""
    import json

    path, config = external
    cfg = json.loads(Path(config).read_text())
    cfg["rope_parameters"]["rope_theta"] = 12345.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = cli("rewrite", path, "--config", tmp_path / "config.json", "-o", tmp_path / "r.onnx")
    assert r.exit_code == 2 and "disagrees" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def bad_inputs(external, folder: Path) -> dict:
    """case -> (arguments, expected text): files made in `folder` from the external-data model."""
    import shutil

    path, config = external
    cut = folder / "cut"
    cut.mkdir()
    shutil.copy(path, cut / path.name)
    data = path.with_name(f"{path.name}.data").read_bytes()
    (cut / f"{path.name}.data").write_bytes(data[: len(data) // 2])
    lost = folder / "lost"
    lost.mkdir()
    shutil.copy(path, lost / path.name)
    same = folder / "same"
    shutil.copytree(path.parent, same)
    return {
        "truncated external data": ([cut / path.name, "--config", config, "-o", cut / "r.onnx"], "truncated"),
        "missing side file": ([lost / path.name, "--config", config, "-o", lost / "r.onnx"], "does not exist"),
        "output is the input": ([same / path.name, "--config", config, "-o", same / path.name], "--force"),
    }


@pytest.mark.parametrize("case", ["truncated external data", "missing side file", "output is the input"])
def test_bad_large_inputs_exit_2_with_one_line_and_write_nothing(case, external, small_threshold, tmp_path):
    args, expected = bad_inputs(external, tmp_path)[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = cli("rewrite", *args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pe-export: error:") and expected in lines[0], r.output
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed


def test_an_existing_side_file_is_refused_before_the_checks(external, small_threshold, tmp_path):
    path, config = external
    (tmp_path / "r.onnx.data").write_bytes(b"keep")
    r = cli("rewrite", path, "--config", config, "-o", tmp_path / "r.onnx")
    assert r.exit_code == 2 and "r.onnx.data" in r.output and "--force" in r.output, r.output
    assert (tmp_path / "r.onnx.data").read_bytes() == b"keep" and not (tmp_path / "r.onnx").exists()
