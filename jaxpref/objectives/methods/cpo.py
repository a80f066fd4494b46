"""CPO and SimPO (TRL's CPOTrainer): sigmoid / hinge / ipo / simpo on the policy's log-probs plus
`cpo_alpha` times the chosen completions' NLL; method `simpo` is loss type simpo without the NLL
term. No reference model."""
from __future__ import annotations

from dataclasses import dataclass

from jaxpref.errors import ConfigError
from jaxpref.objectives import losses
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods.base import PAIR_METRICS, LossInputs, Method, check_one_loss, logits_metrics


@dataclass
class CpoKeys:
    simpo_gamma: float = 0.5    # SimPO's target margin
    cpo_alpha: float = 1.0      # weight of the NLL term (CPO)


def cpo_loss(x: LossInputs, spec: LossSpec):
    loss, m = losses.simpo_cpo_loss(x.stats, spec, x.reduce)
    return loss, {**m, **logits_metrics(x.stats)}


def check_cpo(pt, loss_types: tuple[str, ...], src: str) -> None:
    """CPOTrainer smooths its sigmoid and simpo losses only, and only simpo has the margin."""
    check_one_loss(pt, loss_types, src, "cpo", smoothed=("sigmoid", "simpo"))
    if loss_types[0] != "simpo" and pt.simpo_gamma != CpoKeys.simpo_gamma:
        raise ConfigError(f"{src}: `post_training.simpo_gamma` would be ignored: cpo's loss_type {loss_types[0]} has "
                          "no margin (loss_type simpo has); leave it out")


def check_simpo(pt, loss_types: tuple[str, ...], src: str) -> None:
    check_one_loss(pt, loss_types, src, "simpo", smoothed=("simpo",))
    if pt.cpo_alpha != CpoKeys.cpo_alpha:
        raise ConfigError(f"{src}: `post_training.cpo_alpha` would be ignored: method simpo has no NLL term (for "
                          "SimPO with it: method cpo, loss_type simpo); leave it out")


CPO = Method("cpo", CpoKeys, data="paired", loss_types=("sigmoid", "hinge", "ipo", "simpo"),
             default_loss_type="sigmoid", reference=False, tokenization="row", loss=cpo_loss, check=check_cpo,
              metrics=PAIR_METRICS + ("nll_loss",),
              paper=("Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in "
                     "Machine Translation", "2401.08417"))
SIMPO = Method("simpo", CpoKeys, data="paired", loss_types=("simpo",), default_loss_type="simpo",
               reference=False, tokenization="row", loss=cpo_loss, check=check_simpo,
              metrics=PAIR_METRICS + ("nll_loss",),
              paper=("SimPO: Simple Preference Optimization with a Reference-Free Reward", "2405.14734"))
