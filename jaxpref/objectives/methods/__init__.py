"""The method table: `post_training.method` -> its `Method` (`base`). Adding a method: write its
module (keys, data kind, reference need, tokenization, loss) and add one row here. The online
methods (grpo, rloo, online_dpo, ppo) train on rollouts (`base`); the run loop does not generate
yet, so `offline_only` refuses them where training would start."""
from __future__ import annotations

from jaxpref.errors import ConfigError
from jaxpref.objectives.methods import cpo, dpo, grpo, kto, online_dpo, orpo, ppo
from jaxpref.objectives.methods.base import LossInputs, Method, RolloutInputs, ScoringInputs

METHODS: dict[str, Method] = {
    "dpo": dpo.DPO,
    "ipo": dpo.IPO,
    "kto": kto.KTO,
    "orpo": orpo.ORPO,
    "simpo": cpo.SIMPO,
    "cpo": cpo.CPO,
    "grpo": grpo.GRPO,
    "rloo": grpo.RLOO,
    "online_dpo": online_dpo.ONLINE_DPO,
    "ppo": ppo.PPO,
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method `{name}`; one of {', '.join(METHODS)}")
    return METHODS[name]


def offline_only(name: str, what: str = "training") -> None:
    """ConfigError (one line) for an online method: the run loop cannot generate yet."""
    if name in METHODS and METHODS[name].online:
        raise ConfigError(f"`post_training.method` {name}: online {what} is not available yet (generation "
                          "inside the training loop comes next); the offline methods train now")


def method_keys() -> list[type]:
    """Every method's key dataclass, once each, in table order."""
    out: list[type] = []
    for m in METHODS.values():
        if m.keys not in out:
            out.append(m.keys)
    return out


__all__ = ["METHODS", "LossInputs", "Method", "RolloutInputs", "ScoringInputs", "get_method", "method_keys",
           "offline_only"]
