"""Training-time position augmentations, in torch. Random by design, so never part of an exported graph:
the exported graphs take positions as an input and are deterministic.

- `sample_positions`: Ruoss et al. 2023's randomized positions, a sorted random subset of [0, M) per
  row, as `noisy_fixed_positional_encodings` draws it (google-deepmind/randomized_positional_encodings@57bc5d0:
  `sort(choice(arange(M), size=N, replace=False))`). Feed them as `position_ids` of a `randomized-*` export.
- `cape_positions`: CAPE's positions (Likhomanenko et al. 2021) with its training augmentations, in
  the order and with the distributions of gcambara/cape@058df08 `CAPE1d._augment_positions`; embed them
  with `pe_export.encodings.cape.embed_torch`.
"""

from __future__ import annotations

import math

import torch

from pe_export.encodings.cape import CapeParams
from pe_export.encodings.randomized import check_lengths


def sample_positions(
    batch: int, length: int, noise_max_length: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, length) int64: each row a uniformly random subset of [0, noise_max_length), sorted
    ascending, without repeats."""
    check_lengths(length, noise_max_length)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    keys = torch.rand((batch, noise_max_length), generator=generator)  # a random permutation per row
    return keys.argsort(dim=1)[:, :length].sort(dim=1).values


def cape_positions(
    position_ids: torch.Tensor,
    p: CapeParams,
    *,
    training: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, S) float positions: pos_scale * n, minus the row mean when `normalize`; in training,
    (positions + global shift + local shift) * global scale with
        global shift  ~ U(-max_global_shift, max_global_shift)        per row
        local shift   ~ U(-eps / 2, eps / 2), eps = pos_scale * max_local_shift   per token
        log(scale)    ~ U(-ln max_global_scaling, ln max_global_scaling)          per row
    drawn in that order (the local shift only when max_local_shift > 0), as CAPE1d does."""
    positions = p.pos_scale * position_ids.to(dtype)  # (B, S)
    if p.normalize:
        positions = positions - positions.mean(dim=1, keepdim=True)
    if not training:
        return positions
    B, S = positions.shape
    delta = torch.empty((B, 1), dtype=dtype).uniform_(-p.max_global_shift, p.max_global_shift, generator=generator)
    delta_local = 0
    if p.max_local_shift:
        eps = p.pos_scale * p.max_local_shift
        delta_local = torch.empty((B, S), dtype=dtype).uniform_(-eps / 2.0, eps / 2.0, generator=generator)
    log_scaling = math.log(p.max_global_scaling)
    log_lambdas = torch.empty((B, 1), dtype=dtype).uniform_(-log_scaling, log_scaling, generator=generator)
    return (positions + delta + delta_local) * torch.exp(log_lambdas)
