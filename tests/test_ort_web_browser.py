"""The `ort-web-browser` runtimes: onnxruntime-web in a headless Chromium page (WASM, and WebGPU when the
browser offers an adapter) agree with the float64 reference on llama-rope's files, say which backend
ran, and record what they do out of range; the local server serves only its folders, on 127.0.0.1; a
browser that dies is a Crash. Skipped with the reason when chromium (Debian's package) is absent."""

import http.client
import os

import pytest
from conftest import exported

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.presets import PRESETS
from pe_export.runtimes import Skip
from pe_export.spec import Spec
from pe_export.verification.out_of_range import probe_bounds
from pe_export.verification.parity import check

BROWSER = ("ort-web-browser", "ort-web-browser-webgpu")


def llama(op: str, dtype: str = "fp32") -> Spec:
    return Spec(
        encoding="rope", params=dict(PRESETS["llama-rope"].params), op=op, opset=OP_TARGETS[op].min_opset, dtype=dtype
    )


def needs_chromium():
    from pe_export.runtimes.ort_web_browser import chromium

    try:
        chromium()
    except Skip as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("op", [pytest.param("onnx", marks=pytest.mark.slow), "decomposed"])
def test_llama_rope_agrees_with_the_float64_reference_in_the_page(op):
    needs_chromium()
    spec = llama(op)
    rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=BROWSER)}
    wasm, webgpu = rows["ort-web-browser"], rows["ort-web-browser-webgpu"]
    assert wasm.verdict == "pass", wasm
    assert wasm.provider.startswith("onnxruntime-web 1.30.0 wasm in HeadlessChrome/"), wasm.provider
    assert wasm.worst_ratio <= 1.0 and wasm.max_abs > 0  # it computed (fp32 rounding), within the bound
    if webgpu.verdict == "skipped":  # the browser offers no adapter: the row says what it said
        assert "requestAdapter" in webgpu.note or "navigator.gpu" in webgpu.note, webgpu
    else:
        assert webgpu.verdict == "pass" and " webgpu in HeadlessChrome/" in webgpu.provider, webgpu
        assert "WebGPU adapter" in webgpu.provider, webgpu.provider


def test_fp16_runs_on_wasm_and_needs_shader_f16_on_webgpu():
    needs_chromium()
    spec = llama("decomposed", "fp16")
    rows = {r.runtime: r for r in check(spec, exported(spec), runtimes=BROWSER)}
    assert rows["ort-web-browser"].verdict == "pass", rows["ort-web-browser"]
    webgpu = rows["ort-web-browser-webgpu"]
    if "swiftshader" in webgpu.note + webgpu.provider:  # Chromium's CPU Vulkan has no shader-f16 (measured)
        assert webgpu.verdict == "unsupported" and "lacks shader-f16" in webgpu.note, webgpu
    else:
        assert webgpu.verdict in ("pass", "skipped", "unsupported"), webgpu


def test_out_of_range_positions_are_recorded():
    """WASM's Gather fails loudly; WebGPU on SwiftShader returns a result for -1 and P (measured: GPU
    gathers do not check their indices), which --probe-bounds reports as SILENT."""
    needs_chromium()
    spec = llama("decomposed")
    rows = {r.runtime: r for r in probe_bounds(spec, exported(spec), runtimes=BROWSER)}
    assert rows["ort-web-browser"].verdict == "loud", rows["ort-web-browser"]
    webgpu = rows["ort-web-browser-webgpu"]
    assert webgpu.verdict in ("loud", "SILENT", "skipped"), webgpu  # never ABORTS: the page's error is a row
    if webgpu.verdict == "SILENT":
        assert "position_ids -1" in webgpu.note and "position_ids 8192" in webgpu.note, webgpu


@pytest.mark.parametrize("runtime", BROWSER)
def test_without_chromium_the_runtimes_skip_with_the_install_command(monkeypatch, runtime):
    from pe_export.runtimes import RUNTIMES

    monkeypatch.setenv("PE_EXPORT_CHROMIUM", "/nonexistent/chromium")
    spec = llama("decomposed")
    with pytest.raises(
        Skip, match=r"PE_EXPORT_CHROMIUM=/nonexistent/chromium is not an executable \(apt-get install chromium"
    ):
        RUNTIMES[runtime](spec, exported(spec))


def test_the_server_serves_its_folders_only_on_localhost(tmp_path):
    from pe_export.runtimes.ort_web_browser import serve

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.bin").write_bytes(b"abc")
    (tmp_path / "secret").write_bytes(b"no")
    server = serve({"data": tmp_path / "data"}, writable="data")
    try:
        host, port = server.server_address
        assert host == "127.0.0.1"

        def request(method, path, body=None):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request(method, path, body=body)
            reply = conn.getresponse()
            return reply.status, reply.read(), reply.getheader("Cross-Origin-Embedder-Policy")

        assert request("GET", "/data/a.bin") == (200, b"abc", "require-corp")
        assert request("GET", "/data/../secret")[0] == 404  # a path out of its folder is not served
        assert request("GET", "/other/a.bin")[0] == 404
        assert request("PUT", "/data/out.bin", b"xyz")[0] == 204
        assert (tmp_path / "data" / "out.bin").read_bytes() == b"xyz"
        assert request("PUT", "/data/../written", b"x")[0] == 403 and not (tmp_path / "written").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_a_browser_that_dies_is_a_crash():
    needs_chromium()
    from pe_export.runtimes.ort_web_browser import Browser, chromium
    from pe_export.runtimes.worker import Crash

    b = Browser(chromium())
    try:
        assert b.version.startswith("Chrome/")  # Browser.getVersion: "Chrome/156.0.8078.114"
        b.proc.kill()
        with pytest.raises(Crash, match="chromium killed by signal 9"):
            b.send("Browser.getVersion")
    finally:
        b.close()


def test_the_folders_of_processes_that_are_gone_are_removed(tmp_path, monkeypatch):
    """A worker is killed with SIGKILL: its browser profile and page files are removed by the next process."""
    import subprocess
    import sys

    from pe_export.runtimes import ort_web_browser

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(ort_web_browser.tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    ort_web_browser.scratch.cache_clear()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"pe-export-browser-{int(gone.stdout)}"
    (dead / "chromium-x").mkdir(parents=True)
    live = tmp_path / f"pe-export-browser-{os.getppid()}"  # our parent is alive
    live.mkdir()
    try:
        mine = ort_web_browser.scratch()
        assert mine == tmp_path / f"pe-export-browser-{os.getpid()}" and mine.is_dir()
        assert not dead.exists() and live.exists()
    finally:
        ort_web_browser.scratch.cache_clear()


@pytest.mark.slow
def test_rewrite_verified_in_the_page(tmp_path):
    """`pe-export rewrite --runtimes ort-web-browser`: the rewritten tiny Llama's cos/sin against float64
    up to the table's end, and the whole model against the original at positions 0-15, in the page
    (every output of the graph comes back: pe_export.runtimes.GRAPH_RUNTIMES)."""
    needs_chromium()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import rewrite_models as rm

    from pe_export.rewriter import apply as api
    from pe_export.rewriter import checks as verify

    model, cfg = rm.build(rm.BY_NAME["llama"])
    path, config = rm.export(model, tmp_path / "model.onnx"), rm.save_config(cfg, tmp_path)
    original, result = api.load(path), api.rewrite(api.load(path), config)
    api.prune(result.model)
    (row,) = verify.check_sites(original, result.model, result.sites, ("ort-web-browser",))
    assert row.verdict == "pass" and "wasm in HeadlessChrome" in row.provider, row
    assert row.positions[-1] == 32767 and row.rewritten_error[-1] <= row.bound < row.original_error[-1]
    (whole,) = verify.check_whole(original, result.model, ("ort-web-browser",))
    assert whole.verdict == "pass", whole
