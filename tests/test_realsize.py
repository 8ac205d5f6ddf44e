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
    from pe_export.rewriter import checks, rewrite_and_verify
    from pe_export.runtimes import worker

    path, config = external
    seen = []  # (what the runtime was given, how many runtime workers were alive then)
    load = worker.load

    def spy(name, adapter, spec, model, *args, **kwargs):
        seen.append((name, type(model).__name__, sum(w.alive() for w in worker._POOL.values())))
        return load(name, adapter, spec, model, *args, **kwargs)

    worker.shutdown()
    monkeypatch.setattr(worker, "load", spy)
    run = rewrite_and_verify(path, config, output=tmp_path / "r.onnx")
    rows = [*run.site_rows, *run.whole_rows]
    assert run.verdict == "pass" and rows and all(r.verdict == "pass" for r in rows), rows
    assert {r.runtime for r in run.whole_rows} == {"ort-cpu", "ort-cpu-noopt"}
    site = run.site_rows[0]
    assert site.rewritten_error[-1] <= site.bound < site.original_error[-1], site  # the fix, at the last row
    assert seen and all(kind == "str" for _, kind, _ in seen), seen  # paths, never bytes
    assert max(alive for _, _, alive in seen) <= 1, seen  # one runtime's worker at a time
    assert (tmp_path / "r.onnx.data").is_file()
    assert not list(path.parent.glob(".pe-export-checks-*")), "the check copies were not removed"
    # The same checks by bytes (the in-memory route: weights read into memory, the threshold back up).
    import onnx_ir as ir

    from pe_export.rewriter import apply

    monkeypatch.setattr("pe_export.files.EXTERNAL_DATA_THRESHOLD", 2**30)
    original = ir.external_data.load_to_model(apply.load(path))
    result = apply.rewrite(original, config)
    seen.clear()
    in_memory = checks.check_sites(original, result.model, result.sites)
    assert seen and all(kind == "bytes" for _, kind, _ in seen), seen
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
