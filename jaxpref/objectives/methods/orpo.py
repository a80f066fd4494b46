"""ORPO (TRL's ORPOTrainer): the chosen sequence's NLL minus beta times the log-sigmoid of the
log-odds ratio of the length-averaged log-probs; no reference model."""
from __future__ import annotations

from dataclasses import dataclass

from jaxpref.errors import check_choice
from jaxpref.objectives import losses
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods.base import PAIR_METRICS, LossInputs, Method, check_one_loss, logits_metrics


@dataclass
class OrpoKeys:
    orpo_nll_span: str = "prompt_and_completion"   # or "completion": the NLL term's tokens


def orpo_loss(x: LossInputs, spec: LossSpec):
    loss, m = losses.orpo_loss(x.stats, spec, spec.orpo_nll_span, x.reduce)
    return loss, {**m, **logits_metrics(x.stats)}


def check(pt, loss_types: tuple[str, ...], src: str) -> None:
    check_one_loss(pt, loss_types, src, "orpo")
    check_choice(pt.orpo_nll_span, ("prompt_and_completion", "completion"), "post_training.orpo_nll_span", src)


ORPO = Method("orpo", OrpoKeys, data="paired", loss_types=("orpo",), default_loss_type="orpo",
              reference=False, tokenization="row", loss=orpo_loss,
              metrics=PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"), check=check,
              paper=("ORPO: Monolithic Preference Optimization without Reference Model", "2403.07691"))
