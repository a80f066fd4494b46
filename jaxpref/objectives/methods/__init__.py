"""The method table: `post_training.method` -> its `Method` (`base`). Adding a method: write its
module (keys, data kind, reference need, tokenization, loss) and add one row here. The online
methods (grpo, rloo, online_dpo, ppo) train on rollouts (`base`): grpo and rloo through
`jaxpref.training.online_loop`; `offline_only` refuses online methods where there is no loop
for them (evaluation)."""
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
    """ConfigError (one line) for an online method where only the offline methods run."""
    if name in METHODS and METHODS[name].online:
        raise ConfigError(f"`post_training.method` {name}: {what} of an online method is not available yet")


def method_keys() -> list[type]:
    """Every method's key dataclass, once each, in table order."""
    out: list[type] = []
    for m in METHODS.values():
        if m.keys not in out:
            out.append(m.keys)
    return out


__all__ = ["METHODS", "LossInputs", "Method", "RolloutInputs", "ScoringInputs", "get_method", "method_keys",
           "offline_only"]
