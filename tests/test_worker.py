"""One process per runtime (pe_export.runtimes.worker): a runtime that aborts or hangs is a CRASH or TIMEOUT
row and every other row completes; the report, the reproduction bundle and the exit code are those of
a failure; --probe-bounds reports "aborts the process" as an outcome of its own (tract, for real, on a
position past its table); a check reuses one worker per runtime for all its probes."""

import json

import fake_runtimes
import pytest
from conftest import exported, rope_spec
from test_cli import invoke

from pe_export.runtimes import RUNTIMES, Skip, worker
from pe_export.verification.out_of_range import probe_bounds
from pe_export.verification.parity import FAILED, check, verdict

SPEC = rope_spec(op="decomposed")  # llama-like RoPE, 256 positions: every runtime here loads it


def test_an_aborting_runtime_is_a_crash_row_and_the_others_complete(monkeypatch):
    monkeypatch.setitem(RUNTIMES, "aborts", fake_runtimes.aborts)
    rows = {r.runtime: r for r in check(SPEC, exported(SPEC), runtimes=("torch", "aborts", "ort-cpu"))}
    assert list(rows) == ["torch", "aborts", "ort-cpu"]
    crash = rows["aborts"]
    assert crash.verdict == "CRASH" and "CRASH" in FAILED
    assert "SIGABRT" in crash.note and "fake runtime: about to abort" in crash.note  # the signal, its stderr
    assert crash.note.startswith("probe spread:")  # the first probe: it loaded, then died
    assert rows["torch"].verdict == rows["ort-cpu"].verdict == "pass"
    assert verdict(list(rows.values())) == "FAIL"


def test_a_crash_while_loading_and_a_hang(monkeypatch):
    monkeypatch.setitem(RUNTIMES, "aborts-on-load", fake_runtimes.aborts_on_load)
    monkeypatch.setitem(RUNTIMES, "hangs", fake_runtimes.hangs)
    rows = {
        r.runtime: r for r in check(SPEC, exported(SPEC), runtimes=("aborts-on-load", "hangs", "ort-cpu"), timeout=3)
    }
    assert rows["aborts-on-load"].verdict == "CRASH" and rows["aborts-on-load"].note.startswith("loading the model:")
    assert rows["hangs"].verdict == "TIMEOUT" and "no answer within 3 s" in rows["hangs"].note
    assert rows["ort-cpu"].verdict == "pass"
    assert verdict(list(rows.values())) == "FAIL"


def test_verify_with_a_crashing_runtime_reports_bundles_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.setitem(RUNTIMES, "aborts", fake_runtimes.aborts)
    model = tmp_path / "m.onnx"
    model.write_bytes(exported(SPEC))
    report = tmp_path / "r.json"
    result = invoke("verify", str(model), "--runtimes", "torch,ort-cpu,aborts", "--report", str(report))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "aborts CRASH" in text and "SIGABRT" in text and "parity check failed" in text
    doc = json.loads(report.read_text())
    assert doc["verdict"] == "FAIL"
    assert [(r["runtime"], r["verdict"]) for r in doc["rows"]] == [
        ("torch", "pass"),
        ("ort-cpu", "pass"),
        ("aborts", "CRASH"),
    ]
    readme = (tmp_path / "m.onnx.repro" / "README.txt").read_text()
    assert "--runtimes aborts" in readme  # the bundle re-runs the crashing runtime only
    assert (
        "aborts: running the probe raised" in readme and "SIGABRT" in readme
    )  # re-running it crashed its worker, not us


def test_probe_bounds_says_which_runtime_aborts_the_process(tmp_path, monkeypatch):
    monkeypatch.setitem(RUNTIMES, "aborts-out-of-range", fake_runtimes.aborts_out_of_range)
    rows = {
        r.runtime: r for r in probe_bounds(SPEC, exported(SPEC), runtimes=("ort-cpu", "aborts-out-of-range", "torch"))
    }
    assert rows["ort-cpu"].verdict == rows["torch"].verdict == "loud"
    aborts = rows["aborts-out-of-range"]
    # both bad positions were tried: the second in a fresh process after the first killed one
    assert aborts.verdict == "ABORTS" and aborts.note.count("SIGABRT") == 2
    assert "position_ids -1" in aborts.note and "position_ids 256" in aborts.note

    model = tmp_path / "m.onnx"
    model.write_bytes(exported(SPEC))
    report = tmp_path / "r.md"
    result = invoke(
        "verify",
        str(model),
        "--runtimes",
        "torch,ort-cpu,aborts-out-of-range",
        "--probe-bounds",
        "--report",
        str(report),
    )
    assert result.exit_code == 0, result.output  # in-range parity passed; out of range is a warning, as SILENT
    assert "| aborts-out-of-range | ABORTS |" in report.read_text()


def test_tract_aborts_on_a_position_past_the_table():
    """tract 0.23 panics in its Gather and aborts (issue 15): the row says so, with the panic."""
    try:
        RUNTIMES["tract"](SPEC, exported(SPEC))  # loading is safe in-process; running out of range is not
    except Skip as e:
        pytest.skip(str(e))
    (row,) = probe_bounds(SPEC, exported(SPEC), runtimes=("tract",))
    assert row.verdict == "ABORTS" and "SIGABRT" in row.note and "panicked at" in row.note, row
    (row,) = check(SPEC, exported(SPEC), runtimes=("tract",))  # in range it runs, in a fresh worker
    assert row.verdict == "pass", row


def test_one_worker_per_runtime_for_every_probe_and_check():
    data = exported(SPEC)
    check(SPEC, data, runtimes=("ort-cpu",))
    w = worker._POOL[worker._key("ort-cpu", RUNTIMES["ort-cpu"])]
    pid = w.process.pid
    other = rope_spec(op="onnx")
    assert check(other, exported(other), runtimes=("ort-cpu",))[0].verdict == "pass"
    assert worker._POOL[worker._key("ort-cpu", RUNTIMES["ort-cpu"])].process.pid == pid  # reused, a new model loaded


def test_an_adapter_the_worker_cannot_import_is_a_failed_row(monkeypatch):
    monkeypatch.setitem(RUNTIMES, "local", lambda spec, data: (None, "local"))
    (row,) = check(SPEC, exported(SPEC), runtimes=("local",))
    assert row.verdict == "FAIL" and "not a module-level function" in row.note
