"""CUDA parity: runs only where a CUDA execution provider loads, and asserts CUDA really ran."""

import pytest
from conftest import exported
from test_encodings import spec_for
from test_parity import preset_spec

from pe_export.custom_ops.lowerings import OP_TARGETS
from pe_export.presets import PRESETS
from pe_export.spec import DTYPES
from pe_export.verification.parity import check

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="CUDAExecutionProvider not available"
)


@pytest.mark.parametrize("op", OP_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_parity(op, dtype):
    spec = preset_spec("llama-rope", op, "bhsd", dtype, seq=8192)
    row = check(spec, exported(spec), runtimes=("ort-cuda",))[0]
    assert row.provider == "CUDAExecutionProvider"
    assert row.verdict == "pass", row


@pytest.mark.parametrize("preset", [n for n, p in PRESETS.items() if p.encoding != "rope"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_parity_other_encodings(preset, dtype):
    spec = spec_for(preset, dtype)
    row = check(spec, exported(spec), runtimes=("ort-cuda",))[0]
    assert row.provider == "CUDAExecutionProvider"
    assert row.verdict == "pass", row
