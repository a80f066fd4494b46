"""RoPE scalings (LongRoPE, YaRN) read from config.json with transformers' defaults resolved, as the frozen
(key, value) pairs `layers.rope_inv_freq` and `layers.rope_attention_factor` take."""
from __future__ import annotations

import math

from jaxpref.errors import ModelSourceError

KINDS = ("default", "linear", "llama3", "longrope", "yarn")   # what `layers.rope_inv_freq` computes


def longrope(hf: dict, rope: dict, rotary_dim: int, family: str) -> tuple:
    """LongRoPE's factors with transformers' defaults resolved: the pretraining length
    (`original_length`), and the cos/sin factor sqrt(1 + ln(s) / ln(original))
    for s = `factor`, else max_position_embeddings / original (1 when s <= 1), unless given."""
    original = original_length(hf, rope, family)
    factor = rope.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    for key in ("short_factor", "long_factor"):
        if len(rope.get(key) or ()) != rotary_dim // 2:
            raise ModelSourceError(f"{family}: rope `{key}` needs {rotary_dim // 2} entries, one per rotated "
                                   f"frequency; got {len(rope.get(key) or ())}")
    return (("attention_factor", float(attention)), ("long_factor", tuple(rope["long_factor"])),
            ("original_max_position_embeddings", int(original)), ("rope_type", "longrope"),
            ("short_factor", tuple(rope["short_factor"])))


def original_length(hf: dict, rope: dict, family: str) -> int:
    """The pretraining length a scaled RoPE starts from, as transformers resolves it: Phi-3's
    config class has a top-level `original_max_position_embeddings` (4096 by default), which
    overrides the rope dict's; elsewhere the rope dict's, else config.json's top-level one, else
    `max_position_embeddings`."""
    key = "original_max_position_embeddings"
    if family == "phi3":
        return int(hf.get(key, 4096) or rope.get(key) or 4096)
    return int(rope.get(key) or hf.get(key) or hf["max_position_embeddings"])


def yarn(hf: dict, rope: dict, family: str) -> tuple:
    """YaRN's settings with transformers' defaults resolved: `factor` (else max_position_embeddings /
    original length), the cos/sin `attention_factor` (else 0.1 ln(factor) + 1, or the ratio of
    two such terms scaled by `mscale` / `mscale_all_dim` when both are given; 1 when factor <= 1),
    `beta_fast` 32, `beta_slow` 1, `truncate` true."""
    original = original_length(hf, rope, family)
    factor = rope.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original
    factor = float(factor)

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return (("attention_factor", float(attention)), ("beta_fast", float(rope.get("beta_fast") or 32)),
            ("beta_slow", float(rope.get("beta_slow") or 1)), ("factor", factor),
            ("original_max_position_embeddings", int(original)), ("rope_type", "yarn"),
            ("truncate", bool(rope.get("truncate", True))))


def llama3(hf: dict, rope: dict, family: str) -> tuple:
    """Llama 3's scaling with its pretraining length resolved (`original_length`: transformers
    takes max_position_embeddings when the rope dict has none)."""
    return freeze({**rope, "original_max_position_embeddings": original_length(hf, rope, family)})


def resolve(hf: dict, rope, family: str, rotary_dim: int):
    """A config.json RoPE dict (`rope_scaling` / `rope_parameters`) as the frozen pairs the decoder
    reads: YaRN, Llama 3 and LongRoPE with transformers' defaults resolved, any other kind as given
    (`weights.check_spec` refuses the kinds the decoder does not compute); not a dict: as is."""
    if not isinstance(rope, dict):
        return rope
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "yarn":
        return yarn(hf, rope, family)
    if kind == "llama3":
        return llama3(hf, rope, family)
    if kind == "longrope":
        return longrope(hf, rope, rotary_dim, family)
    return freeze(rope)


def freeze(d):
    """A config dict as sorted (key, value) pairs, lists as tuples: hashable, for the frozen args."""
    if not isinstance(d, dict):
        return d
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))
