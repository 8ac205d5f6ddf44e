"""Randomized positional encodings (Ruoss et al. 2023, "Randomized Positional Encodings Boost Length
Generalization of Transformers", arXiv 2305.16843), as google-deepmind/randomized_positional_encodings@57bc5d0
(models/positional_encodings.py) trains them: a sequence of length N gets the positions of a sorted
random subset of [0, M) instead of 0 .. N-1, `M = noise_max_length` > N, so that every table row up to M
is seen in training and a test sequence longer than N still reads trained rows.

The sampling is training-time randomness and never exported (`pe_export.encodings.training.sample_positions`).
The export is the wrapped encoding itself over a table of M rows, with the positions as an input
(`position_ids`, or `query_positions` / `key_positions`), so a caller feeds sampled or ordinary
positions: `randomized(enc)` is `enc` with the same contract, module, reference, probes and op targets
(RoPE keeps its three), whose parameters add `train_length` (N) to the wrapped encoding's and read
`max_positions` (`--seq`) as `noise_max_length` (M); M < N is refused. Its probes add one sorted random
subset of N positions, as training feeds them. Registered: `randomized-rope` (DeepMind's NOISY_ROTARY);
`randomized(ENCODINGS.get(name))` wraps sinusoidal (NOISY_SIN_COS), learned (NOISY_LEARNT) or ALiBi the
same way (ALiBi's bias on sampled query and key positions; DeepMind's NOISY_ALIBI samples distances).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pe_export.encodings import ENCODINGS, Encoding, parse
from pe_export.encodings.rope import ROPE


def check_lengths(train_length, noise_max_length) -> None:
    if not isinstance(train_length, int) or train_length < 1:
        raise ValueError(f"train_length must be an integer >= 1, got {train_length!r}")
    if noise_max_length < train_length:
        raise ValueError(
            f"noise_max_length (max_positions, --seq) must be >= train_length {train_length} (it samples "
            f"{train_length} distinct positions below it), got {noise_max_length}"
        )


def randomized_params(cls: type) -> type:
    """The wrapped encoding's parameter dataclass plus `train_length`, checked against `max_positions`."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Params(cls):
        train_length: int

        def __post_init__(self):
            super().__post_init__()
            check_lengths(self.train_length, self.max_positions)  # max_positions is noise_max_length

    Params.__name__ = Params.__qualname__ = f"Randomized{cls.__name__}"
    return Params


def randomized(enc: Encoding) -> Encoding:
    params = randomized_params(enc.params)

    def inner(spec):
        """The wrapped encoding's spec: the same, less `train_length` (validated first)."""
        parse(params, spec)
        return dataclasses.replace(
            spec, encoding=enc.name, params={k: v for k, v in spec.params.items() if k != "train_length"}
        )

    def probes(spec, rng, batch=2):
        from pe_export.encodings.probing import user_probe

        p = parse(params, spec)
        cases = enc.probes(inner(spec), rng, batch)
        sampled = np.sort(rng.choice(p.max_positions, size=p.train_length, replace=False))  # as training feeds
        return cases + [("sampled", user_probe(spec, cases[0][1], sampled, rng, batch))]

    return dataclasses.replace(
        enc,
        name=f"randomized-{enc.name}",
        params=params,
        module=lambda spec: enc.module(inner(spec)),
        example_inputs=lambda spec: enc.example_inputs(inner(spec)),
        probes=probes,
        reference=lambda spec, inputs: enc.reference(inner(spec), inputs),
        translation_table=lambda spec: enc.translation_table(inner(spec)),
        magnitude=lambda spec, inputs: enc.magnitude(inner(spec), inputs),
        locate=lambda spec, inputs, at: enc.locate(inner(spec), inputs, at),
        derived=lambda spec: enc.derived(inner(spec)),
        reference_impl=f"{enc.reference_impl}; positions as google-deepmind/randomized_positional_encodings 57bc5d0 "
        f"samples them",
    )


ENCODINGS.register("randomized-rope")(randomized(ROPE))
