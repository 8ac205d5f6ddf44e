"""`pe-export verify` and `pe-export matrix`: the runtime adapters on a file with a known answer, a
corrupted table entry caught with its row and position (and a reproduction bundle that re-runs it), the
CUDA adapter's fallback detection, --positions, --probe-bounds, reports, and `matrix --quick` in full."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import exported, rope_spec
from onnx import numpy_helper
from test_cli import invoke

from pe_export.encodings.probing import make_probes, parse_positions
from pe_export.runtimes import HEAVY_RUNTIMES, RUNTIMES, Skip
from pe_export.spec import Spec
from pe_export.verification.out_of_range import probe_bounds
from pe_export.verification.parity import check, verdict
from pe_export.verification.tolerances import TOLERANCES

# dim 2 with the paper's layout: PE(p) = [sin(p), cos(p)], the answer without any of pe-export's code.
TINY = Spec(encoding="sinusoidal", params={"dim": 2, "max_positions": 8}, op="decomposed", opset=17)


@pytest.mark.parametrize(
    "runtime", [pytest.param(n, marks=[pytest.mark.heavy_runtimes] if n in HEAVY_RUNTIMES else []) for n in RUNTIMES]
)
def test_each_runtime_adapter_gives_the_known_answer(runtime):
    try:
        call, provider = RUNTIMES[runtime](TINY, exported(TINY))
    except Skip as e:
        pytest.skip(str(e))
    ids = np.array([[0, 1, 7], [3, 5, 6]], dtype=np.int64)
    got = call({"position_ids": ids})
    p = ids.astype(np.float64)
    want = np.stack([np.sin(p), np.cos(p)], axis=-1)
    assert provider
    assert got.shape == (2, 3, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=2**-23)


def corrupt(tmp_path, row=200, col=3):
    """llama-rope at 256 positions, opset-23 op, with one entry of the cos table changed by 0.01."""
    good = tmp_path / "good.onnx"
    assert invoke("llama-rope", "--seq", "256", "-o", str(good)).exit_code == 0
    model = onnx.load(good)
    cos = next(t for t in model.graph.initializer if tuple(t.dims) == (256, 64) and "cos" in t.name)
    table = numpy_helper.to_array(cos).copy()
    table[row, col] += 0.01
    cos.CopyFrom(numpy_helper.from_array(table, cos.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    return bad


def test_a_corrupted_table_entry_fails_with_its_row_and_position(tmp_path):
    bad = corrupt(tmp_path)
    result = invoke("verify", str(bad), "--runtimes", "ort-cpu,onnx-reference", "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "ort-cpu FAIL" in text and "position 200" in text
    doc = json.loads((tmp_path / "r.json").read_text())
    rows = {r["runtime"]: r for r in doc["rows"]}
    assert doc["verdict"] == "FAIL"
    for name in ("ort-cpu", "onnx-reference"):
        assert rows[name]["verdict"] == "FAIL" and "position 200" in rows[name]["where"]
        # dims 3 and 3 + 32 (rotate-half) are the two outputs that read cos[200, 3]
        assert rows[name]["where"].endswith(("dim 3", "dim 35"))
        # the error is 0.01 * |x| at most: one entry, not the whole table
        assert 0 < rows[name]["max_abs"] < 0.01 * 6


def test_a_failure_writes_a_bundle_whose_command_reproduces_it(tmp_path):
    bad = corrupt(tmp_path)
    assert invoke("verify", str(bad), "--runtimes", "ort-cpu", "--seed", "3").exit_code == 1
    folder = tmp_path / "bad.onnx.repro"
    (npz,) = folder.glob("ort-cpu-*.npz")  # named after the probe with the worst error
    assert sorted(p.name for p in folder.iterdir()) == sorted(["README.txt", "model.onnx", npz.name, "spec.json"])
    readme = (folder / "README.txt").read_text()
    command = next(line.split() for line in readme.splitlines() if line.strip().startswith("pe-export verify"))
    assert command[1:] == ["verify", "model.onnx", "--runtimes", "ort-cpu", "--seed", "3", "--batch", "2"]
    with np.load(npz) as data:
        err = np.abs(data["output"] - data["truth"])
        assert (err > data["bound"]).any()  # the saved arrays show the failure by themselves
        assert data["input_position_ids"].max() == 255
    again = invoke(*command[1:], cwd=folder)  # the one command, run in the bundle
    assert again.exit_code == 1 and "position 200" in " ".join(again.output.split())
    # a second failure does not overwrite the first bundle
    assert invoke("verify", str(bad), "--runtimes", "ort-cpu").exit_code == 1
    assert (tmp_path / "bad.onnx.repro.2" / "README.txt").exists()


def test_cuda_fallback_to_cpu_is_a_failure(monkeypatch):
    """Force ORT's silent fallback: CUDA listed as available, but every session lands on CPU."""
    ort = pytest.importorskip("onnxruntime")
    real = ort.InferenceSession

    class FallsBack(real):
        def __init__(self, model, opts=None, providers=None, **kw):
            super().__init__(model, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallsBack)
    monkeypatch.setattr("pe_export.runtimes.worker.IN_PROCESS", {"torch", "ort-cuda"})  # where the patched ORT is
    row = check(TINY, exported(TINY), runtimes=("ort-cuda",))[0]
    assert row.verdict == "FAIL"
    assert "asked for CUDAExecutionProvider but the session runs on CPUExecutionProvider" in row.note
    assert verdict([row]) == "FAIL"


def test_positions_probe_exactly_those_positions():
    spec = rope_spec(max_positions=4096)
    wanted = parse_positions("7,4090:4096")
    assert wanted.expand(4096).tolist() == [7, 4090, 4091, 4092, 4093, 4094, 4095]
    rows = check(spec, exported(spec), runtimes=("ort-cpu",), positions=wanted, batch=3)
    assert rows[0].verdict == "pass" and rows[0].probes[-1] == "positions"
    name, inputs = make_probes(spec, 0, 3, wanted)[-1]
    assert name == "positions" and inputs["position_ids"].tolist() == [[7, 4090, 4091, 4092, 4093, 4094, 4095]] * 3
    assert inputs["x"].shape == (3, 3, 7, 64)  # batch, the probes' three heads, the positions, head_dim


@pytest.mark.parametrize(
    "args,message",
    [
        (["--positions", "0,300"], "300 is outside the table [0, 256)"),
        (["--positions", "250:300"], "250:300 is outside the table [0, 256)"),
        (["--positions", "-3:2"], "-3:2 is outside the table [0, 256)"),
        (["--positions", "5:2"], "integers and ranges a:b"),
        (["--positions", "x"], "integers and ranges a:b"),
        (["--runtimes", "tpu"], "--runtimes takes a comma-separated list of torch, ort-cpu"),
        (["--runtimes", "ort-cpu", "--providers", "cpu"], "not both"),
        (["--batch", "0"], "--batch"),
    ],
)
def test_bad_verify_options_exit_2(tmp_path, args, message):
    model = tmp_path / "m.onnx"
    assert invoke("llama-rope", "--seq", "256", "-o", str(model)).exit_code == 0
    result = invoke("verify", str(model), *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_huge_positions_range_is_refused_before_it_is_built(tmp_path):
    """0:10000000000 would be 10^10 integers (80 GB): the range is checked against the table first."""
    model = tmp_path / "m.onnx"
    assert invoke("llama-rope", "--seq", "256", "-o", str(model)).exit_code == 0
    result = invoke("verify", str(model), "--positions", "0:10000000000")
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "pe-export: error: --positions: 0:10000000000 is outside the table [0, 256); use --probe-bounds to check "
        "out-of-range handling"
    ]


def test_an_infinite_error_keeps_its_position_and_the_report_is_standard_json(monkeypatch):
    """A runtime whose output is NaN at position 5 and -inf at position 2 (the truth is finite there):
    both are infinite errors, the worst there are, and both must stay in the error-by-position curve."""
    import fake_runtimes

    from pe_export.verification.report import render, verify_doc

    monkeypatch.setitem(RUNTIMES, "broken", fake_runtimes.broken)  # runs in its worker, as any runtime
    (row,) = check(TINY, b"", runtimes=("broken",), positions=parse_positions("0:8"))
    assert row.verdict == "FAIL" and row.max_abs == np.inf
    by = row.by_position
    assert by["positions"] == list(range(8))  # the grid of 8 positions, none dropped
    assert [p for p, e in zip(by["positions"], by["max_abs"]) if e == np.inf] == [2, 5]
    assert all(0 <= e < 1e-6 for p, e in zip(by["positions"], by["max_abs"]) if p not in (2, 5))

    d = row.as_dict()
    assert d["by_position"]["positions"] == list(range(8)) and d["by_position"]["infinite"] == [2, 5]
    assert d["by_position"]["max_abs"][2] is None and d["by_position"]["max_abs"][5] is None
    assert d["by_position"]["bound"] == by["bound"]  # finite bounds are written as they are
    assert {"max_abs", "max_rel", "worst_error", "worst_ratio"} <= set(d["infinite"]) and d["max_abs"] is None
    assert row.max_abs == np.inf  # as_dict does not touch the row itself
    doc = verify_doc("m.onnx", TINY, [row], "FAIL")
    text = render(doc, Path("r.json")).decode()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON token {name}"))
    md = render(doc, Path("r.md")).decode()
    assert "| broken | broken | inf |" in md and "(inf)" in md  # max abs error and worst ratio read "inf", not blank
    ok = check(TINY, exported(TINY), runtimes=("ort-cpu",))[0].as_dict()
    assert ok["infinite"] == [] and ok["by_position"]["infinite"] == []


def test_probe_bounds_reports_a_runtime_that_returns_a_result(monkeypatch):
    spec = rope_spec(op="decomposed")
    import fake_runtimes

    monkeypatch.setitem(RUNTIMES, "lenient", fake_runtimes.lenient)  # never checks its indices
    rows = {
        r.runtime: r
        for r in probe_bounds(spec, exported(spec), runtimes=("torch", "ort-cpu", "onnx-reference", "lenient"))
    }
    assert rows["torch"].verdict == rows["ort-cpu"].verdict == rows["onnx-reference"].verdict == "loud"
    assert (
        rows["lenient"].verdict == "SILENT"
        and "position_ids -1" in rows["lenient"].note
        and "256" in rows["lenient"].note
    )


@pytest.mark.parametrize("op", ["onnx", "ort", "decomposed"])
def test_every_target_fails_loudly_on_ort_and_the_evaluator(op):
    spec = rope_spec(op=op)
    rows = probe_bounds(spec, exported(spec), runtimes=("ort-cpu", "ort-cpu-noopt", "onnx-reference"))
    assert all(r.verdict in ("loud", "skipped") for r in rows), rows
    assert rows[0].verdict == "loud"


def test_markdown_and_json_reports(tmp_path):
    model = tmp_path / "m.onnx"
    assert invoke("t5-bias", "--seq", "128", "-o", str(model)).exit_code == 0
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    assert (
        invoke("verify", str(model), "--runtimes", "torch,ort-cpu", "--probe-bounds", "--report", str(md)).exit_code
        == 0
    )
    assert invoke("verify", str(model), "--runtimes", "torch,ort-cpu", "--report", str(js)).exit_code == 0
    text = md.read_text()
    assert "| ort-cpu | CPUExecutionProvider |" in text and "**pass**" in text and "Out-of-range positions" in text
    doc = json.loads(js.read_text())
    ort = doc["rows"][1]
    assert ort["runtime"] == "ort-cpu" and ort["vs_torch_max_abs"] is not None
    by = ort["by_position"]
    assert by["positions"] == sorted(by["positions"]) and by["positions"][-1] == 127
    assert all(e <= b for e, b in zip(by["max_abs"], by["bound"]))
    assert "--runtimes torch,ort-cpu" in doc["command"]


def test_one_tolerance_table_with_reasons():
    from pe_export.spec import DTYPES, OP_NAMES

    assert set(TOLERANCES) == {(d, o) for d in DTYPES for o in OP_NAMES}
    assert all(t.reason and t.factor == 2.0 for t in TOLERANCES.values())


# ------------------------------------------------------------------------------------------------
# matrix


@pytest.mark.parametrize("shard", ["1/2", pytest.param("2/2", marks=pytest.mark.slow)])
def test_matrix_quick_report_has_every_expected_row(shard, tmp_path):
    """Half the quick matrix by default (about 90 s here), the other half under -m slow: together every case."""
    from pe_export.tools import matrix

    report = tmp_path / "quick.json"
    result = invoke(
        "matrix",
        "--quick",
        "--runtimes",
        "torch,ort-cpu,onnx-reference",
        "--shard",
        shard,
        "--report",
        str(report),
        cwd=tmp_path,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    want = [
        (c.preset, c.op, c.dtype, c.seq) for c in matrix.shard(matrix.cases(quick=True), *matrix.parse_shard(shard))
    ]
    got = [(c["preset"], c["op"], c["dtype"], c["seq"]) for c in doc["cases"]]
    assert got == want and len(want) == len(matrix.cases(quick=True)) // 2  # 66 quick cases: 33 in each half
    assert len({c[0] for c in got}) >= 20  # every n-th case: presets of every kind in each half
    for case in doc["cases"]:
        rows = {r["runtime"]: r for r in case["rows"]}
        assert list(rows) == ["torch", "ort-cpu", "onnx-reference"], case
        assert rows["torch"]["verdict"] == rows["ort-cpu"]["verdict"] == "pass", case
        assert rows["onnx-reference"]["verdict"] == ("skipped" if case["op"] == "ort" else "pass"), case
    s = doc["summary"]
    assert s["FAIL"] == 0 and s["rows"] == 3 * len(want) and s["pass"] + s["skipped"] == s["rows"]
    assert not (tmp_path / "matrix-repro").exists()


def test_matrix_shards_split_the_cases():
    from pe_export.tools import matrix

    everything = matrix.cases()
    parts = [matrix.shard(everything, i, 3) for i in (1, 2, 3)]
    assert sorted(sum(parts, []), key=everything.index) == everything
    assert len({c for p in parts for c in p}) == len(everything)
    full = {(c.preset, c.op, c.dtype) for c in everything}
    assert {("llama3.1-rope", "ort", "bf16"), ("t5-bias", "decomposed", "fp16")} <= full
    assert ("t5-bias", "onnx", "fp32") not in full  # only the targets an encoding lowers to


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shard", "4/3"], "--shard takes i/n"),
        (["--presets", "llama-rop"], "unknown preset 'llama-rop'"),
        (["--dtypes", "fp8"], "--dtypes takes fp32, fp16, bf16"),
        (["--presets", "t5-bias", "--ops", "onnx"], "no case matches"),
        (["--presets", ""], "--presets takes a comma-separated list of llama-rope"),
        (["--presets", " , "], "--presets takes a comma-separated list of"),
        (["--ops", ""], "--ops takes a comma-separated list of onnx, ort, decomposed"),
        (["--dtypes", ""], "--dtypes takes a comma-separated list of fp32, fp16, bf16"),
        (["--runtimes", ""], "--runtimes takes a comma-separated list of torch"),
    ],
)
def test_bad_matrix_options_exit_2(args, message):
    result = invoke("matrix", *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_matrix_failure_exits_1_with_a_bundle(tmp_path, monkeypatch):
    import pe_export.verification.bundles
    import pe_export.verification.parity

    real = pe_export.verification.parity.bound
    monkeypatch.setattr(
        pe_export.verification.parity, "bound", lambda spec, inputs: real(spec, inputs) / 1e6
    )  # a planted bug
    report = tmp_path / "m.md"
    result = invoke(
        "matrix",
        "--presets",
        "bloom-alibi",
        "--dtypes",
        "fp32",
        "--runtimes",
        "ort-cpu",
        "--report",
        str(report),
        cwd=tmp_path,
    )
    assert result.exit_code == 1
    assert "1 of 1 cases failed" in " ".join(result.output.split())
    assert "| bloom-alibi | decomposed | fp32 | 2048 | ort-cpu |" in report.read_text()
    assert (tmp_path / "matrix-repro" / "bloom-alibi-decomposed-fp32-2048" / "README.txt").exists()


def fake_matrix(monkeypatch, write_bundle):
    """run_case with the export and the check replaced: every case fails on one row."""
    import pe_export.pipeline.onnx_export
    import pe_export.verification.bundles
    import pe_export.verification.parity
    from pe_export.verification.parity import Row

    class Model:
        def SerializeToString(self):
            return b"onnx"

    monkeypatch.setattr(pe_export.pipeline.onnx_export, "build", lambda spec: Model())
    monkeypatch.setattr(
        pe_export.verification.parity,
        "check",
        lambda spec, data, runtimes, seed: [Row("ort-cpu", "cpu", spec.dtype, "FAIL", note="planted")],
    )
    monkeypatch.setattr(pe_export.verification.bundles, "write_bundle", write_bundle)


def test_every_quick_case_fails_into_its_own_bundle_and_counts_once(tmp_path, monkeypatch):
    """--quick has llama-rope onnx fp32 at 256 and at 8192 positions: their files and bundles differ."""
    from pe_export.tools import matrix

    def write_bundle(folder, *args):
        folder.mkdir(parents=True)  # as the real one: the folder must not exist yet
        return [folder]

    fake_matrix(monkeypatch, write_bundle)
    quick = matrix.cases(quick=True)
    (tmp_path / "onnx").mkdir()
    results = [matrix.run_case(c, tmp_path / "onnx", ("ort-cpu",), 0, tmp_path / "repro") for c in quick]
    assert [r["error"] for r in results] == [""] * len(quick)
    assert len({r["bundle"] for r in results}) == len(quick) == len(list((tmp_path / "onnx").iterdir()))
    s = matrix.summary(results)
    assert (s["cases"], s["rows"], s["FAIL"], s["failed_cases"]) == (len(quick),) * 4
    assert len({c.name for c in matrix.cases()}) == len(matrix.cases())
    assert matrix.cases(["llama-rope", "llama-rope"], dtypes=["fp32", "fp32"]) == matrix.cases(
        ["llama-rope"], dtypes=["fp32"]
    )


def test_a_bundle_that_cannot_be_written_does_not_count_the_case_twice(tmp_path, monkeypatch):
    from pe_export.tools import matrix

    def write_bundle(folder, *args):
        raise OSError("No space left on device")

    fake_matrix(monkeypatch, write_bundle)
    result = matrix.run_case(
        matrix.Case("bloom-alibi", "decomposed", "fp32", 64), tmp_path, ("ort-cpu",), 0, tmp_path / "repro"
    )
    assert result["verdict"] == "FAIL" and result["error"] == "" and result["bundle"] == ""
    assert result["bundle_error"] == "OSError: No space left on device"
    s = matrix.summary([result])
    assert (s["cases"], s["rows"], s["FAIL"], s["failed_cases"]) == (1, 1, 1, 1)
    export_error = {**result, "rows": [], "error": "ValueError: planted", "bundle_error": ""}
    assert (matrix.summary([export_error])["rows"], matrix.summary([export_error])["FAIL"]) == (1, 1)
