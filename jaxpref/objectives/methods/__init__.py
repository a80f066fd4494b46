"""The method table: `post_training.method` -> its `Method` (`base`). Adding a method: write its
module (keys, data kind, reference need, tokenization, loss) and add one row here."""
from __future__ import annotations

from jaxpref.errors import ConfigError
from jaxpref.objectives.methods import cpo, dpo, kto, orpo
from jaxpref.objectives.methods.base import LossInputs, Method

METHODS: dict[str, Method] = {
    "dpo": dpo.DPO,
    "ipo": dpo.IPO,
    "kto": kto.KTO,
    "orpo": orpo.ORPO,
    "simpo": cpo.SIMPO,
    "cpo": cpo.CPO,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method `{name}`; one of {', '.join(METHODS)}")
    return METHODS[name]


def method_keys() -> list[type]:
    """Every method's key dataclass, once each, in table order."""
    out: list[type] = []
    for m in METHODS.values():
        if m.keys not in out:
            out.append(m.keys)
    return out


__all__ = ["METHODS", "LossInputs", "Method", "get_method", "method_keys"]
