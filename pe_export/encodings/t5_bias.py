"""T5 bucketed relative position bias (Raffel et al. 2020, arXiv 1910.10683, §2.1).

Must match transformers 5.23 `T5Attention._relative_position_bucket` and `compute_bias` (adapted from
Mesh TensorFlow): the distance `key - query` is put in one of `num_buckets` buckets, exact below
`max_exact` and logarithmic up to `max_distance`; bidirectional (encoder) splits the buckets by sign,
causal (decoder) sends every future key to bucket 0. A learned (num_buckets, H) table maps buckets
to per-head biases; T5 adds no 1/sqrt(d) scaling.

Distances in a graph of `max_positions` P lie in (-P, P), so the bucket of every one is computed at
export time (float64, `log` only of distances >= max_exact: no log(0)) into a (2P - 1,) index table;
the graph reads it, then the learned table: two guarded Gathers, no float math.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_export import weights
from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.contracts import contract
from pe_export.encodings.size import check_size
from pe_export.encodings.table_reads import check_positions, guard, take


@dataclass(frozen=True, kw_only=True)
class T5BiasParams(weights.LearnedWeights):
    heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    max_positions: int = 512

    def __post_init__(self):
        self.check_weights()
        for name in ("heads", "num_buckets", "max_distance", "max_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        # a (2P - 1,) int64 bucket table, built from float64 distances; verification: (H, 2, P) float64 biases
        check_size(self.max_positions, stored=16, working=64 + 64 * self.heads)
        smallest = 4 if self.bidirectional else 2
        if self.num_buckets < smallest:
            mode = "bidirectional" if self.bidirectional else "causal"
            raise ValueError(f"num_buckets must be >= {smallest} in {mode} mode, got {self.num_buckets}")
        if self.max_distance <= max_exact(self):
            raise ValueError(
                f"max_distance must be > {max_exact(self)} (the exact buckets of num_buckets {self.num_buckets}), "
                f"got {self.max_distance}"
            )


def max_exact(p: T5BiasParams) -> int:
    return (p.num_buckets // 2 if p.bidirectional else p.num_buckets) // 2


def buckets(p: T5BiasParams, relative_position: np.ndarray) -> np.ndarray:
    """int64 bucket of each `key - query` distance, as `_relative_position_bucket`."""
    n = p.num_buckets // 2 if p.bidirectional else p.num_buckets
    rel = np.asarray(relative_position, dtype=np.int64)
    if p.bidirectional:
        offset, rel = (rel > 0) * n, np.abs(rel)
    else:
        offset, rel = 0, -np.minimum(rel, 0)
    exact = max_exact(p)
    large = exact + (np.log(np.maximum(rel, exact) / exact) / np.log(p.max_distance / exact) * (n - exact)).astype(
        np.int64
    )
    return offset + np.where(rel < exact, rel, np.minimum(large, n - 1))


def table(p: T5BiasParams) -> np.ndarray:
    """float64 (num_buckets, H) learned table."""
    shape = (p.num_buckets, p.heads)
    if p.weights is None:
        return weights.random(p.weights_seed, {"table": shape}, {})["table"]
    t = weights.load(p)
    if t.shape != shape:
        raise ValueError(
            f"tensor {p.key!r} of {p.weights!r} has shape {tuple(t.shape)}, want {shape} (num_buckets, heads)"
        )
    return t


def module(spec):
    import torch

    from pe_export.dtypes import torch_dtype

    p = parse(T5BiasParams, spec)
    P = p.max_positions

    class T5Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # bucket_of[d + P - 1] = bucket of distance d, for every d in (-P, P).
            self.register_buffer("bucket_of", torch.from_numpy(buckets(p, np.arange(1 - P, P))))  # (2P - 1,)
            self.register_buffer("table", torch.from_numpy(table(p)).to(torch_dtype(spec.dtype)))  # (num_buckets, H)

        def forward(self, query_positions, key_positions):  # (Q,), (K,) -> (1, H, Q, K)
            q, k = guard(query_positions, P), guard(key_positions, P)  # out of range -> P
            bad = (q[:, None] == P) | (k[None, :] == P)
            index = torch.where(bad, 2 * P - 1, k[None, :] - q[:, None] + (P - 1))  # (Q, K), past the table if bad
            return take(self.table, take(self.bucket_of, index)).permute(2, 0, 1)[None]

    return T5Bias().eval()


def reference(spec, inputs):
    p = parse(T5BiasParams, spec)
    q, k = inputs["query_positions"], inputs["key_positions"]
    check_positions(q, p.max_positions, "query position")
    check_positions(k, p.max_positions, "key position")
    values = table(p)[buckets(p, k[None, :] - q[:, None])]  # (Q, K, H)
    return values.transpose(2, 0, 1)[None]


ENCODINGS.register("t5-bias")(
    Encoding(
        name="t5-bias",
        params=T5BiasParams,
        module=module,
        reference=reference,
        magnitude=lambda spec, inputs: np.abs(reference(spec, inputs)),  # the table is rounded once
        **contract("bias", T5BiasParams),
        reference_impl="transformers 5.23 T5Attention._relative_position_bucket and compute_bias",
        attention_scale=False,
    )
)
