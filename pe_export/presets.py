"""Presets: real models' positional encodings, as plain data (no torch import).

Each sets the encoding and its parameters, the table length (`max_positions`) being the model's
context length; `--seq` sets the table length and every parameter can be overridden on the command line. Values from the models' published config.json files
(`shared/reference/encodings.md` section 9).
"""

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    encoding: str
    description: str
    params: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="llama-rope",
            encoding="rope",
            description="Llama 3 (8B/70B) attention RoPE: rotate-half, theta 500000, no scaling",
            params=dict(head_dim=128, theta=500000.0, pairing="half", scaling="default", max_positions=8192),
        ),
        Preset(
            name="llama2-rope",
            encoding="rope",
            description="Llama 2 attention RoPE: rotate-half, theta 10000",
            params=dict(head_dim=128, theta=10000.0, pairing="half", scaling="default", max_positions=4096),
        ),
        Preset(
            name="gpt-j-rope",
            encoding="rope",
            description="GPT-J 6B: interleaved pairs, 64 of 256 head dims rotated, theta 10000",
            params=dict(head_dim=256, rotary_dim=64, theta=10000.0, pairing="interleaved", scaling="default", max_positions=2048),
        ),
        Preset(
            name="gpt-neox-rope",
            encoding="rope",
            description="GPT-NeoX / Pythia: rotate-half, 25% partial rotary (32 of 128), theta 10000",
            params=dict(head_dim=128, rotary_dim=32, theta=10000.0, pairing="half", scaling="default", max_positions=2048),
        ),
    ]
}
