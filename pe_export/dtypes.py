"""The float dtypes pe-export exports, their NumPy and torch types, and their rounding constants.

A leaf module: everything that needs a dtype's name, type or epsilon imports it from here.
"""

from __future__ import annotations

import numpy as np

DTYPES = ("fp32", "fp16", "bf16")
EPS = {"fp32": 2.0**-23, "fp16": 2.0**-10, "bf16": 2.0**-7}  # machine epsilon
DENORM_MIN = {"fp32": 2.0**-149, "fp16": 2.0**-24, "bf16": 2.0**-133}  # spacing of the subnormals


def numpy_dtype(name: str):
    import ml_dtypes

    return {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}[name]


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
