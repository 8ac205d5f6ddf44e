"""Presets: real models' positional encodings, as plain data (no torch import).

Each sets the encoding and its parameters, the table length (`max_positions`) being the model's
context length; `--seq` sets the table length and every parameter can be overridden on the command
line. Values from the models' published config.json files (`shared/reference/encodings.md` section 9).
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
            name="llama3.1-rope",
            encoding="rope",
            description="Llama 3.1 8B/70B/405B: theta 500000, llama3 scaling x8 from 8192 to 131072",
            params=dict(
                head_dim=128,
                theta=500000.0,
                pairing="half",
                max_positions=131072,
                scaling="llama3",
                scaling_params=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192),
            ),
        ),
        Preset(
            name="llama3.2-1b-rope",
            encoding="rope",
            description="Llama 3.2 1B: head_dim 64, theta 500000, llama3 scaling x32 from 8192",
            params=dict(
                head_dim=64,
                theta=500000.0,
                pairing="half",
                max_positions=131072,
                scaling="llama3",
                scaling_params=dict(
                    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192
                ),
            ),
        ),
        Preset(
            name="llama2-rope",
            encoding="rope",
            description="Llama 2 attention RoPE: rotate-half, theta 10000",
            params=dict(head_dim=128, theta=10000.0, pairing="half", scaling="default", max_positions=4096),
        ),
        Preset(
            name="mistral-rope",
            encoding="rope",
            description="Mistral 7B v0.1: rotate-half, theta 10000, 32768 positions",
            params=dict(head_dim=128, theta=10000.0, pairing="half", scaling="default", max_positions=32768),
        ),
        Preset(
            name="qwen2-rope",
            encoding="rope",
            description="Qwen2 7B: rotate-half, theta 1000000, 131072 positions",
            params=dict(head_dim=128, theta=1000000.0, pairing="half", scaling="default", max_positions=131072),
        ),
        Preset(
            name="qwen2.5-yarn-rope",
            encoding="rope",
            description="Qwen2.5 long-context recipe: theta 1000000, YaRN x4 from 32768 to 131072",
            params=dict(
                head_dim=128,
                theta=1000000.0,
                pairing="half",
                max_positions=131072,
                scaling="yarn",
                scaling_params=dict(factor=4.0, original_max_positions=32768),
            ),
        ),
        Preset(
            name="phi3-mini-128k-rope",
            encoding="rope",
            description="Phi-3-mini-128k (April 2024 rope block, as in Phi-3-vision-128k-instruct's config.json): "
            "LongRoPE x32 from 4096, head_dim 96",
            params=dict(
                head_dim=96,
                theta=10000.0,
                pairing="half",
                max_positions=131072,
                scaling="longrope",
                scaling_params=dict(
                    original_max_positions=4096,
                    factor=32.0,
                    # config.json's rope_scaling (type "su"), verbatim: 48 = head_dim / 2 values each.
                    long_factor=[
                        1.0299999713897705,
                        1.0499999523162842,
                        1.0499999523162842,
                        1.0799999237060547,
                        1.2299998998641968,
                        1.2299998998641968,
                        1.2999999523162842,
                        1.4499999284744263,
                        1.5999999046325684,
                        1.6499998569488525,
                        1.8999998569488525,
                        2.859999895095825,
                        3.68999981880188,
                        5.419999599456787,
                        5.489999771118164,
                        5.489999771118164,
                        9.09000015258789,
                        11.579999923706055,
                        15.65999984741211,
                        15.769999504089355,
                        15.789999961853027,
                        18.360000610351562,
                        21.989999771118164,
                        23.079999923706055,
                        30.009998321533203,
                        32.35000228881836,
                        32.590003967285156,
                        35.56000518798828,
                        39.95000457763672,
                        53.840003967285156,
                        56.20000457763672,
                        57.95000457763672,
                        59.29000473022461,
                        59.77000427246094,
                        59.920005798339844,
                        61.190006256103516,
                        61.96000671386719,
                        62.50000762939453,
                        63.3700065612793,
                        63.48000717163086,
                        63.48000717163086,
                        63.66000747680664,
                        63.850006103515625,
                        64.08000946044922,
                        64.760009765625,
                        64.80001068115234,
                        64.81001281738281,
                        64.81001281738281,
                    ],
                    short_factor=[
                        1.05,
                        1.05,
                        1.05,
                        1.1,
                        1.1,
                        1.1,
                        1.2500000000000002,
                        1.2500000000000002,
                        1.4000000000000004,
                        1.4500000000000004,
                        1.5500000000000005,
                        1.8500000000000008,
                        1.9000000000000008,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.000000000000001,
                        2.1000000000000005,
                        2.1000000000000005,
                        2.2,
                        2.3499999999999996,
                        2.3499999999999996,
                        2.3499999999999996,
                        2.3499999999999996,
                        2.3999999999999995,
                        2.3999999999999995,
                        2.6499999999999986,
                        2.6999999999999984,
                        2.8999999999999977,
                        2.9499999999999975,
                        3.049999999999997,
                        3.049999999999997,
                        3.049999999999997,
                    ],
                ),
            ),
        ),
        Preset(
            name="gemma-rope",
            encoding="rope",
            description="Gemma 7B: head_dim 256, rotate-half, theta 10000, 8192 positions",
            params=dict(head_dim=256, theta=10000.0, pairing="half", scaling="default", max_positions=8192),
        ),
        Preset(
            name="falcon-rope",
            encoding="rope",
            description="Falcon 7B: head_dim 64, rotate-half, theta 10000 (FalconConfig default), 2048 positions",
            params=dict(head_dim=64, theta=10000.0, pairing="half", scaling="default", max_positions=2048),
        ),
        Preset(
            name="deepseek-v3-rope",
            encoding="rope",
            description="DeepSeek-V3: interleaved, rope head dim 64, YaRN x40 from 4096 with mscale 1/1",
            params=dict(
                head_dim=64,
                theta=10000.0,
                pairing="interleaved",
                max_positions=163840,
                scaling="yarn",
                scaling_params=dict(
                    factor=40.0,
                    original_max_positions=4096,
                    beta_fast=32.0,
                    beta_slow=1.0,
                    mscale=1.0,
                    mscale_all_dim=1.0,
                ),
            ),
        ),
        Preset(
            name="gpt-j-rope",
            encoding="rope",
            description="GPT-J 6B: interleaved pairs, 64 of 256 head dims rotated, theta 10000",
            params=dict(
                head_dim=256, rotary_dim=64, theta=10000.0, pairing="interleaved", scaling="default", max_positions=2048
            ),
        ),
        Preset(
            name="gpt-neox-rope",
            encoding="rope",
            description="GPT-NeoX / Pythia: rotate-half, 25% partial rotary (32 of 128), theta 10000",
            params=dict(
                head_dim=128, rotary_dim=32, theta=10000.0, pairing="half", scaling="default", max_positions=2048
            ),
        ),
        Preset(
            name="vaswani-sinusoidal",
            encoding="sinusoidal",
            description="Transformer base (Vaswani 2017): interleaved sin/cos, d_model 512, base 10000",
            params=dict(dim=512, base=10000.0, layout_variant="interleaved", max_positions=2048),
        ),
        Preset(
            name="bert-learned",
            encoding="learned",
            description="BERT-base learned absolute positions: 512 x 768 table",
            params=dict(dim=768, rows=512),
        ),
        Preset(
            name="gpt2-learned",
            encoding="learned",
            description="GPT-2 (small) wpe: 1024 x 768 learned table",
            params=dict(dim=768, rows=1024),
        ),
        Preset(
            name="shaw",
            encoding="shaw",
            description="Shaw et al. 2018 relative keys and values, clip k = 16, Transformer-base heads (8 x 64)",
            params=dict(heads=8, head_dim=64, max_relative_position=16, max_positions=512),
        ),
        Preset(
            name="transformer-xl",
            encoding="transformer-xl",
            description="Transformer-XL wt103: 16 heads x 64, d_model 1024, clamp_len 1000, mem_len 1600 + 128 tokens",
            params=dict(heads=16, head_dim=64, d_model=1024, clamp_len=1000, mem_len=1600, max_positions=1728),
        ),
        Preset(
            name="t5-bias",
            encoding="t5-bias",
            description="T5-base encoder bucketed bias: 32 buckets, max distance 128, 12 heads, bidirectional",
            params=dict(heads=12, num_buckets=32, max_distance=128, bidirectional=True, max_positions=512),
        ),
        Preset(
            name="t5-decoder-bias",
            encoding="t5-bias",
            description="T5-base decoder bucketed bias: 32 buckets, max distance 128, 12 heads, causal",
            params=dict(heads=12, num_buckets=32, max_distance=128, bidirectional=False, max_positions=512),
        ),
        Preset(
            name="bloom-alibi",
            encoding="alibi",
            description="BLOOM-560m ALiBi: 16 heads, BLOOM's key-position convention, causal",
            params=dict(heads=16, causal=True, convention="bloom", max_positions=2048),
        ),
        Preset(
            name="mpt-alibi",
            encoding="alibi",
            description="MPT-7B ALiBi: 32 heads, alibi_bias_max 8, MPT's last-key convention, causal",
            params=dict(heads=32, causal=True, convention="mpt", alibi_bias_max=8.0, max_positions=2048),
        ),
        Preset(
            name="deberta-v3",
            encoding="deberta",
            description="DeBERTa-v3-base disentangled attention: 12 heads x 64, 256 log buckets, c2p and p2c, shared "
            "keys",
            params=dict(
                heads=12,
                head_dim=64,
                position_buckets=256,
                max_relative_positions=-1,
                max_position_embeddings=512,
                pos_att_type="p2c|c2p",
                share_att_key=True,
                norm_rel_ebd=True,
                max_positions=512,
            ),
        ),
        Preset(
            name="kerple-log",
            encoding="kerple",
            description="KERPLE log kernel -p*log(1+a|i-j|), 12 heads (the paper's 162M GPT-NeoX), p and a as "
            "initialised, causal",
            params=dict(heads=12, variant="log", causal=True, max_positions=2048),
        ),
        Preset(
            name="kerple-power",
            encoding="kerple",
            description="KERPLE power kernel -a|i-j|^p (0 < p <= 2), 12 heads, p and a as initialised, causal",
            params=dict(heads=12, variant="power", causal=True, max_positions=2048),
        ),
        Preset(
            name="fire",
            encoding="fire",
            description="FIRE bias: MLP(psi(c(i-j))/psi(c max(i,L))), 12 heads, MLP width 32, c 0.1, L 512, seeded "
            "weights, causal",
            params=dict(heads=12, mlp_width=32, init_c=0.1, init_L=512.0, max_positions=2048),
        ),
        Preset(
            name="sandwich",
            encoding="sandwich",
            description="Sandwich sinusoidal bias with NeMo's per-head scaling, 12 heads, hidden size 64, causal",
            params=dict(heads=12, hidden_size=64, causal=True, max_positions=2048),
        ),
        Preset(
            name="xpos",
            encoding="xpos",
            description="xPos (torchscale XPOS defaults): interleaved RoPE x zeta^(n/512), query role, head_dim 64",
            params=dict(head_dim=64, scale_base=512.0, role="query", max_positions=2048),
        ),
        Preset(
            name="cape-text",
            encoding="cape",
            description="CAPE text recipe (gcambara/cape README, CAPE1d 058df08): global shift 5, local 1, scaling "
            "1.03, no normalisation",
            params=dict(
                dim=512,
                max_global_shift=5.0,
                max_local_shift=1.0,
                max_global_scaling=1.03,
                normalize=False,
                max_positions=2048,
            ),
        ),
        Preset(
            name="randomized-rope",
            encoding="randomized-rope",
            description="Ruoss et al. NOISY_ROTARY: interleaved RoPE, head_dim 8 (64 / 8 heads), noise_max_length "
            "2048, trained on 40",
            params=dict(head_dim=8, theta=10000.0, pairing="interleaved", train_length=40, max_positions=2048),
        ),
    ]
}


# ---- Models whose layers differ: one RoPE parameter set per layer type, and layers without RoPE (NoPE) ----------


@dataclass(frozen=True, kw_only=True)
class LayeredPreset:
    """A model whose layers use different RoPE: `rope` {layer type: RoPE parameters}, `pattern` the layer type of
    each layer in order, None for a layer without RoPE. Exported as one file per layer type."""

    name: str
    description: str
    rope: dict[str, dict]
    pattern: tuple[str | None, ...]


def _every(n_layers: int, every: int, hit: str | None, other: str | None, start: int = 1) -> tuple:
    """`hit` at layers i with (i + start) % every == 0, else `other` (transformers' patterns: start 1 for
    Gemma 3 and the NoPE interval, 0 for ModernBERT's global layers)."""
    return tuple(hit if (i + start) % every == 0 else other for i in range(n_layers))


LAYERED_PRESETS: dict[str, LayeredPreset] = {
    p.name: p
    for p in [
        LayeredPreset(
            name="gemma3-rope",
            description="Gemma 3 4B text (34 layers, head_dim 256): sliding layers theta 10000; every 6th layer "
            "full attention, theta 1000000 with linear scaling x8",
            rope={
                "sliding_attention": dict(head_dim=256, theta=10000.0, pairing="half", max_positions=131072),
                "full_attention": dict(
                    head_dim=256,
                    theta=1000000.0,
                    pairing="half",
                    max_positions=131072,
                    scaling="linear",
                    scaling_params=dict(factor=8.0),
                ),
            },
            pattern=_every(34, 6, "full_attention", "sliding_attention"),
        ),
        LayeredPreset(
            name="modernbert-rope",
            description="ModernBERT-base (22 layers, head_dim 64): local layers theta 10000; layer 0 and every 3rd "
            "global, theta 160000",
            rope={
                "sliding_attention": dict(head_dim=64, theta=10000.0, pairing="half", max_positions=8192),
                "full_attention": dict(head_dim=64, theta=160000.0, pairing="half", max_positions=8192),
            },
            pattern=_every(22, 3, "full_attention", "sliding_attention", start=0),
        ),
        LayeredPreset(
            name="smollm3-rope",
            description="SmolLM3 (transformers 5.23 SmolLM3Config defaults: 36 layers, head_dim 128, theta 2000000): "
            "every 4th layer NoPE",
            rope={"full_attention": dict(head_dim=128, theta=2000000.0, pairing="half", max_positions=32768)},
            pattern=_every(36, 4, None, "full_attention"),
        ),
        LayeredPreset(
            name="llama4-rope",
            description="Llama 4 text (transformers 5.23 Llama4TextConfig defaults: 48 layers, head_dim 128, theta "
            "500000): interleaved pairs, llama3 scaling x8 from 8192 (low 1, high 4); every 4th layer NoPE",
            rope={
                "chunked_attention": dict(
                    head_dim=128,
                    theta=500000.0,
                    pairing="interleaved",
                    max_positions=131072,
                    scaling="llama3",
                    scaling_params=dict(
                        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192
                    ),
                )
            },
            pattern=_every(48, 4, None, "chunked_attention"),
        ),
    ]
}


# M-RoPE (pe_export.encodings.mrope), values from transformers 5.23: the text configs' defaults
# (Qwen2VLTextConfig / Qwen2_5_VLTextConfig: hidden_size 8192 / 64 heads, default_theta 1e6,
# max_position_embeddings 32768; Qwen3VLTextConfig: head_dim 128, default_theta 5e5, 128000) and the
# rotary modules' default mrope_section (Qwen2VLRotaryEmbedding [16, 24, 24], Qwen3VLTextRotaryEmbedding
# [24, 20, 20], interleaved).
PRESETS.update(
    {
        p.name: p
        for p in [
            Preset(
                name="qwen2-vl-mrope",
                encoding="mrope",
                description="Qwen2-VL text M-RoPE: theta 1000000, sections [16, 24, 24] chunked, 32768 positions",
                params=dict(
                    head_dim=128, theta=1000000.0, mrope_section=[16, 24, 24], max_positions=32768, scaling="default"
                ),
            ),
            Preset(
                name="qwen2.5-vl-mrope",
                encoding="mrope",
                description="Qwen2.5-VL text M-RoPE: theta 1000000, sections [16, 24, 24] chunked, 32768 positions",
                params=dict(
                    head_dim=128, theta=1000000.0, mrope_section=[16, 24, 24], max_positions=32768, scaling="default"
                ),
            ),
            Preset(
                name="qwen3-vl-mrope",
                encoding="mrope",
                description="Qwen3-VL text M-RoPE: theta 500000, sections [24, 20, 20] interleaved, 128000 positions",
                params=dict(
                    head_dim=128,
                    theta=500000.0,
                    mrope_section=[24, 20, 20],
                    mrope_interleaved=True,
                    max_positions=128000,
                    scaling="default",
                ),
            ),
        ]
    }
)
