"""Bad input found by trying the project as a new user would (issue 13, section 4): each exits 2 from the
CLI with one line naming the parameter and its valid range, writes nothing, and raises ValueError (or
BadInput) with the same message from Python. Generated from the registries where the input is per encoding."""

import re

import pytest
from typer.testing import CliRunner

from pe_export.cli.main import app
from pe_export.encodings import ENCODINGS
from pe_export.presets import PRESETS

runner = CliRunner()


def refused(tmp_path, *args) -> str:
    """Run the CLI in an empty folder; assert exit 2, one line on stderr, no traceback, nothing written;
    return the line."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # empty, one per call
    old = os.getcwd()
    os.chdir(folder)
    try:
        result = runner.invoke(app, list(args))
    finally:
        os.chdir(old)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("pe-export: error: "), result.output
    assert "Traceback" not in result.output and not result.stdout.strip(), result.output
    assert not list(folder.iterdir()), list(folder.iterdir())
    return lines[0]


def first_preset(encoding: str):
    return next(p for p in PRESETS.values() if p.encoding == encoding)


# ------------------------------------------------------------------------------------------------
# A huge --seq: one size check for every encoding


HUGE = 10**12


# Shaw's graph holds no per-position table and its probes do not grow with --seq: it exports at 10^12
# positions (its float32 logits are then checked as any others).
NO_TABLE = {"shaw"}
SIZED = [name for name in ENCODINGS.names() if name not in NO_TABLE]
# "the table's N rows": learned tables keep at most the rows they have (the rows are size-checked below).
TOO_LONG = r"max_positions \(--seq\) must be at most (the table's )?\d+"


@pytest.mark.parametrize("encoding", SIZED)
def test_every_encoding_refuses_a_table_that_cannot_fit(encoding):
    params = first_preset(encoding).params | {"max_positions": HUGE}
    with pytest.raises(ValueError, match=TOO_LONG + f".*got {HUGE}"):
        ENCODINGS.get(encoding).params(**params)


@pytest.mark.parametrize("encoding", SIZED)
def test_every_encoding_refuses_a_huge_seq_from_the_cli(tmp_path, encoding):
    line = refused(tmp_path, first_preset(encoding).name, "--seq", str(HUGE), "-o", "x.onnx")
    assert re.search(TOO_LONG, line) and f"got {HUGE}" in line, line


def test_a_table_over_one_onnx_file_is_refused_with_the_largest_that_fits():
    from pe_export.encodings.size import PROTOBUF_LIMIT

    P = PROTOBUF_LIMIT // (4 * 12) + 1  # KERPLE: (P, H) float32
    with pytest.raises(ValueError, match=rf"max_positions \(--seq\) must be at most ({P - 1} |\d+ with the )"):
        ENCODINGS.get("kerple").params(heads=12, max_positions=P)


def test_a_huge_learned_table_is_refused():
    from pe_export.encodings.learned import LearnedParams

    with pytest.raises(ValueError, match=r"rows must be at most \d+ .*, got 1000000000000"):
        LearnedParams(dim=768, rows=HUGE)


def test_the_sizes_the_presets_use_fit():
    for preset in PRESETS.values():
        ENCODINGS.get(preset.encoding).params(**preset.params)

