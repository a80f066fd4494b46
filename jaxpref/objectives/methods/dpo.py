"""DPO and its loss family (TRL's DPOTrainer: sigmoid, hinge, ipo, robust, exo_pair, nca_pair,
bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft, and the
older paired kto_pair), and IPO as DPO with loss type `ipo`."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpref.errors import ConfigError, check_choice
from jaxpref.objectives import losses
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods.base import PAIR_METRICS, LossInputs, Method, entropy_metrics, logits_metrics

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "aot_pair", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
    "kto_pair",
)


@dataclass
class DpoKeys:
    f_divergence_type: str = "reverse_kl"      # reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5       # alpha of alpha_divergence
    use_weighting: bool = False                # WPO
    ld_alpha: float | None = None              # LD-DPO: weight of tokens past the shorter completion
    rpo_alpha: float | None = None             # RPO: adds this weight times the SFT loss
    discopop_tau: float = 0.05                 # DiscoPOP (loss_type discopop): the temperature of its mix


def dpo_loss(x: LossInputs, spec: LossSpec):
    b = x.num_seqs // 2
    sft = None
    if "sft" in spec.loss_types:
        # Unweighted token-mean NLL (LD-DPO weights apply to the preference term only).
        seq = x.batch.tgt_seq
        is_c = ((seq < b) & (x.batch.tgt_full >= 0)).astype(jnp.float32)   # scored chosen tokens
        if x.reduce.pair_w is None:
            sft = -jnp.sum(x.logp * is_c) / jnp.maximum(jnp.sum(is_c), 1.0)
        else:   # per chosen slot, then the group's token mean (`losses.Reduce`)
            nll = -jax.ops.segment_sum((x.logp * is_c).reshape(-1), jnp.minimum(seq, b).reshape(-1), b + 1)[:b]
            sft = x.reduce.token_mean(nll, x.stats.len_chosen)[1]
    ref = x.ref if x.ref is not None else jnp.zeros((x.num_seqs,), jnp.float32)
    loss, m = losses.dpo_loss(x.stats, ref[:b], ref[b:], spec, sft, x.reduce)
    return loss, {**m, **logits_metrics(x.stats), **entropy_metrics(x.stats)}


def check(pt, loss_types: tuple[str, ...], src: str) -> None:
    if "exo_pair" in loss_types and pt.label_smoothing == 0:
        raise ConfigError(f"{src}: `post_training.loss_type` exo_pair needs `label_smoothing` > 0 (the paper uses 1e-3)")
    if "robust" in loss_types and pt.label_smoothing >= 0.5:
        raise ConfigError(f"{src}: `post_training.loss_type` robust needs `label_smoothing` < 0.5")
    if pt.use_weighting and any(lt in ("aot", "aot_unpaired", "aot_pair") for lt in loss_types):
        raise ConfigError(f"{src}: `post_training.use_weighting` does not apply to aot losses")
    if pt.rpo_alpha is not None and "sft" in loss_types:   # the sft term's weight is then loss_weights'
        raise ConfigError(f"{src}: `post_training.rpo_alpha` adds an sft term, and `loss_type` already has one "
                          "(its weight is in `loss_weights`); give one of the two")
    if pt.discopop_tau <= 0:
        raise ConfigError(f"{src}: `post_training.discopop_tau` must be > 0, got {pt.discopop_tau}")
    check_choice(pt.f_divergence_type, ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
            "post_training.f_divergence_type", src)


DPO = Method("dpo", DpoKeys, data="paired", loss_types=LOSS_TYPES, default_loss_type="sigmoid",
             reference=True, tokenization="dpo", loss=dpo_loss,
              metrics=PAIR_METRICS + ("entropy", "mean_token_accuracy"), check=check,
              paper=("Direct Preference Optimization: Your Language Model is Secretly a Reward Model", "2305.18290"))
IPO = Method("ipo", DpoKeys, data="paired", loss_types=LOSS_TYPES, default_loss_type="ipo",
             reference=True, tokenization="dpo", loss=dpo_loss,
              metrics=PAIR_METRICS + ("entropy", "mean_token_accuracy"), check=check,
              paper=("A General Theoretical Paradigm to Understand Learning from Human Preferences", "2310.12036"))
