"""The one size check of every encoding: a table length (`max_positions`, --seq) whose export cannot fit.

Each encoding's parameters call `check_size` with what its export holds per position: `stored` bytes in
the graph (its tables, which one ONNX file limits to 2 GiB) and `working` bytes held at once while the
tables are built in float64 and verified (the probes that read every position or distance), which must
fit in the memory available now. Refusing here, in the parameters, refuses before anything is built or
written; the message names the parameter and the largest value that fits.
"""

from __future__ import annotations

import os

# A serialized ONNX protobuf cannot exceed 2 GiB; tables above this need external data.
PROTOBUF_LIMIT = 2**31 - 2**20


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or physical memory where /proc is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_size(value: int, stored: float, working: float, name: str = "max_positions (--seq)") -> None:
    """Refuse `value` positions (or rows) when `value * working` bytes exceed the memory available or
    `value * stored` bytes of tables exceed one ONNX file."""
    memory = available_memory()
    if working > 0 and value * working > memory:
        raise ValueError(
            f"{name} must be at most {int(memory // working)} with the {memory / 2**30:.1f} GiB of memory available, "
            f"got {value} (about {value * working / 2**30:.1f} GiB to build and verify its tables)"
        )
    if stored > 0 and value * stored > PROTOBUF_LIMIT:
        raise ValueError(
            f"{name} must be at most {int(PROTOBUF_LIMIT // stored)}, got {value}: its tables would take "
            f"{value * stored / 2**30:.1f} GiB, over the 2 GiB limit of one ONNX file"
        )
