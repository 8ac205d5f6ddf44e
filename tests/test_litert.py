"""The `litert` adapter's refusals, without LiteRT or onnx2tf: a missing package skips with the install
hint, and each way onnx2tf can fail (an error, an op it leaves as a TFLite custom op, a process that dies
before it says why) is `Unsupported("does not convert: ...")`, a row and not a crash. A fake converter
(a shell script standing for the converter's Python) writes what onnx2tf's run would have reported.
The real conversions are the `heavy_runtimes` group (tests/test_runtimes_heavy.py)."""

import sys

import pytest
from conftest import rope_spec

from pe_export.runtimes import RUNTIMES, Skip, Unsupported, litert


def test_without_ai_edge_litert_the_adapter_skips_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails as if it were not installed
    with pytest.raises(Skip, match=r"ai-edge-litert is not installed \(pip install 'pe-export\[litert\]'"):
        RUNTIMES["litert"](rope_spec(op="decomposed"), b"")  # refused before it reads the file


def test_a_converter_python_that_does_not_exist_skips_naming_its_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(litert.CONVERTER, str(tmp_path / "no-such-python"))
    with pytest.raises(Skip, match=f"{litert.CONVERTER}=.*no-such-python does not exist"):
        litert.convert(b"", tmp_path)


@pytest.fixture
def fake_converter(monkeypatch, tmp_path):
    """A converter 'Python' that writes $FAKE_RESULT as onnx2tf's result.json (none when it is empty)
    and exits with $FAKE_STATUS, as `python -c SCRIPT model.onnx FOLDER` would."""
    script = tmp_path / "fake-python"
    script.write_text(
        '#!/bin/sh\n[ -n "$FAKE_RESULT" ] && printf "%s" "$FAKE_RESULT" > "$4/result.json"\n'
        'echo "Traceback ... MemoryError: the last line" >&2\nexit "${FAKE_STATUS:-0}"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv(litert.CONVERTER, str(script))
    folder = tmp_path / "out"
    folder.mkdir()
    return lambda result, status=0: (
        monkeypatch.setenv("FAKE_RESULT", result),
        monkeypatch.setenv("FAKE_STATUS", str(status)),
        folder,
    )[2]


@pytest.mark.parametrize(
    "result, status, raises, message",
    [
        (
            '{"missing": "No module named onnx2tf"}',
            0,
            Skip,
            r"onnx2tf is not importable from .*fake-python \(No module named onnx2tf\); pip install",
        ),
        (
            '{"error": "NotImplementedError: Unsupported ONNX dtype in flatbuffer_direct: elem_type=16"}',
            0,
            Unsupported,
            r"^does not convert: NotImplementedError: Unsupported ONNX dtype in flatbuffer_direct: elem_type=16$",
        ),
        (
            '{"version": "2.6.9", "custom": ["RotaryEmbedding", "RotaryEmbedding"]}',
            0,
            Unsupported,
            r"^does not convert: RotaryEmbedding \(onnx2tf leaves it a TFLite custom op, which LiteRT has no kernel "
            r"for\)$",
        ),
        (
            "",
            3,
            Unsupported,
            r"^does not convert: onnx2tf exited with status 3; Traceback \.\.\. MemoryError: the last line$",
        ),
    ],
    ids=["not-installed", "error", "custom-op", "died"],
)
def test_each_way_onnx2tf_fails_is_a_row_of_its_own(fake_converter, result, status, raises, message):
    with pytest.raises(raises, match=message):
        litert.convert(b"not read by the fake", fake_converter(result, status))


def test_a_conversion_that_succeeds_reports_onnx2tfs_version(fake_converter):
    assert litert.convert(b"", fake_converter('{"version": "2.6.9", "custom": []}'))[1] == "2.6.9"
