"""Learned absolute position embeddings (BERT, GPT-2): `W_pos[position_ids]`, a (rows, dim) table.

Must match transformers 5.23 `BertEmbeddings.position_embeddings` and `GPT2Model.wpe` (an `nn.Embedding`
read at the position ids). The table comes from a `.safetensors` file or a torch state dict
(`--weights FILE --key NAME`) of the shape (rows, dim) the preset (or --rows and --dim) gives, or is
seeded N(0, 0.02^2) (BERT's initializer range) for trying it out.
A learned table has no extrapolation: the graph keeps its first `max_positions` (--seq) rows, at most
all of them, and every position past them fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pe_export import weights
from pe_export.encodings import ENCODINGS
from pe_export.encodings.contracts import table_encoding
from pe_export.encodings.size import check_size

INIT_STD = 0.02


@dataclass(frozen=True, kw_only=True)
class LearnedParams(weights.LearnedWeights):
    dim: int
    rows: int  # rows of the learned table (BERT's max_position_embeddings, GPT-2's n_positions)
    max_positions: int | None = None  # table rows kept in the graph (--seq); None: all of them

    def __post_init__(self):
        self.check_weights()
        if self.max_positions is None:
            object.__setattr__(self, "max_positions", self.rows)
        for name in ("dim", "rows", "max_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        check_size(self.rows, stored=4 * self.dim, working=24 * self.dim, name="rows")  # the (rows, dim) table
        if self.max_positions > self.rows:
            raise ValueError(
                f"max_positions (--seq) must be at most the table's {self.rows} rows, got {self.max_positions}"
            )


def table(p: LearnedParams) -> np.ndarray:
    """float64 (max_positions, dim): the first rows of the learned table."""
    if p.weights is None:
        full = weights.random(p.weights_seed, {"table": (p.rows, p.dim)}, {"table": INIT_STD})["table"]
    else:
        full = weights.load(p)
        if full.shape != (p.rows, p.dim):
            # The preset's shape (or the one given) is the model's: a file of another shape is refused, not followed.
            hint = f" (--rows {full.shape[0]} --dim {full.shape[1]})" if full.ndim == 2 else ""
            raise ValueError(
                f"tensor {p.key!r} of {p.weights!r} has shape {tuple(full.shape)}, want ({p.rows}, {p.dim}) (rows, "
                f"dim); "
                f"set rows and dim{hint} to export that shape"
            )
    return full[: p.max_positions]


ENCODINGS.register("learned")(
    table_encoding(
        "learned", LearnedParams, table, "transformers 5.23 BertEmbeddings.position_embeddings, GPT2Model.wpe"
    )
)
