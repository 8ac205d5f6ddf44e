"""The probes a check feeds: the encoding's own, and `--positions` re-shaped into one more."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_export.dtypes import numpy_dtype
from pe_export.encodings.attention import encoding_for
from pe_export.encodings.contracts import contract_of
from pe_export.errors import BadInput
from pe_export.spec import Spec

# Probes


@dataclass(frozen=True)
class Positions:
    """Parsed --positions: half-open ranges (a, b), one position p as (p, p + 1). Expanded only once
    checked against the table, so a slip like 0:10000000000 is refused instead of allocated."""

    ranges: tuple[tuple[int, int], ...]

    def expand(self, P: int) -> np.ndarray:
        for a, b in self.ranges:
            if a < 0 or b > P:
                given = str(a) if b == a + 1 else f"{a}:{b}"
                raise BadInput(
                    f"--positions: {given} is outside the table [0, {P}); "
                    "use --probe-bounds to check out-of-range handling"
                )
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges])


def parse_positions(text: str) -> Positions:
    """'0,100,8190:8192' -> positions [0, 100, 8190, 8191]: integers and half-open ranges a:b, in order given."""
    ranges = []
    for item in text.split(","):
        item = item.strip()
        try:
            if ":" in item:
                a, b = (int(v) for v in item.split(":"))
                if b <= a:
                    raise ValueError
                ranges.append((a, b))
            elif item:
                ranges.append((int(item), int(item) + 1))
        except ValueError:
            raise BadInput(
                f"--positions takes integers and ranges a:b (a < b), comma separated; got {item!r}"
            ) from None
    if not ranges:
        raise BadInput("--positions is empty")
    return Positions(tuple(ranges))


def user_probe(spec: Spec, template: dict, positions: Positions | np.ndarray, rng, batch: int) -> dict:
    """The encoding's own probe re-shaped to the given positions (each batch row gets all of them)."""
    enc = encoding_for(spec)
    P = enc.parse(spec).max_positions
    if isinstance(positions, Positions):
        positions = positions.expand(P)
    if positions.min() < 0 or positions.max() >= P:
        bad = positions[(positions < 0) | (positions >= P)][0]
        raise BadInput(
            f"--positions: {bad} is outside the table [0, {P}); use --probe-bounds to check out-of-range handling"
        )
    dtype = numpy_dtype(spec.dtype)
    noise = lambda shape: rng.standard_normal(shape, dtype=np.float32).astype(dtype)  # noqa: E731
    probe = contract_of(enc).user_probe(spec, template, positions, noise, batch)
    if probe is None:
        raise BadInput(f"--positions does not apply to {enc.name}: its graph takes no position inputs")
    return probe


def make_probes(spec: Spec, seed: int = 0, batch: int = 2, positions: Positions | np.ndarray | None = None):
    """The encoding's probes (spread over the table, its last rows, a decode step, batch > 1) and,
    with `positions`, one more at exactly those positions. Deterministic in (spec, seed, batch)."""
    if batch < 1:
        raise BadInput(f"--batch must be >= 1, got {batch}")
    enc = encoding_for(spec)
    rng = np.random.default_rng(seed)
    probes = enc.probes(spec, np.random.default_rng(seed), batch)
    if positions is not None:
        probes = probes + [("positions", user_probe(spec, probes[0][1], positions, rng, batch))]
    from pe_export.encodings.static_shapes import (
        fit_probes,
    )  # --static-shapes: every probe re-cut to exactly those sizes

    return fit_probes(spec, probes)


def position_grid(spec: Spec, inputs: dict, shape: tuple) -> np.ndarray | None:
    """The table position of each output element, as an array that broadcasts to `shape`, or None."""
    return contract_of(encoding_for(spec)).position_grid(spec, inputs)
