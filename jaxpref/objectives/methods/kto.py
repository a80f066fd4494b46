"""KTO (TRL's KTOTrainer) on unpaired completions with desirability labels; paired data is
unpaired first. Each micro-batch holds the completions and their KL rows
(`jaxpref.data.unpaired`): the 'chosen' half of the stats is the completions, the 'rejected' half
the KL rows."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpref.errors import ConfigError
from jaxpref.objectives import losses
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods.base import LossInputs, Method, check_one_loss, entropy_metrics


@dataclass
class KtoKeys:
    desirable_weight: float = 1.0              # weight of the desirable completions' loss
    undesirable_weight: float = 1.0            # weight of the undesirable completions' loss


def kto_loss(x: LossInputs, spec: LossSpec):
    b = x.num_seqs // 2
    st, labels = x.stats, x.batch.labels
    loss, m = losses.kto_loss(st.logps_chosen, x.ref[:b], jax.lax.stop_gradient(st.logps_rejected),
                              x.ref[b:], labels, spec)
    m = dict(m)
    # Token-weighted mean logits over desirable / undesirable completions.
    m["logits/chosen"] = st.logit_sum_chosen * labels
    m["logits/rejected"] = st.logit_sum_chosen * (1 - labels)
    m["_tokens/chosen"] = st.len_chosen * labels
    m["_tokens/rejected"] = st.len_chosen * (1 - labels)
    # As TRL: a micro-batch without desirable (undesirable) completions logs no chosen (rejected)
    # rewards and logps, and no margin (`step.reduce_metrics`).
    has_c = (jnp.sum(labels) > 0).astype(jnp.float32)[None]
    has_r = (jnp.sum(1 - labels) > 0).astype(jnp.float32)[None]
    for k, here in (("rewards/chosen", has_c), ("logps/chosen", has_c), ("rewards/rejected", has_r),
                    ("logps/rejected", has_r), ("rewards/margins", has_c * has_r)):
        m["_present/" + k] = here
    return loss, {**m, **entropy_metrics(st, accuracy=False)}


def check(pt, loss_types: tuple[str, ...], src: str) -> None:
    check_one_loss(pt, loss_types, src, "kto")
    if pt.precompute_ref_logps:
        raise ConfigError(f"{src}: `post_training.precompute_ref_logps` is not available for KTO "
                          "(its KL rows change with every batch)")


KTO = Method("kto", KtoKeys, data="unpaired", loss_types=("kto", "apo_zero_unpaired"), default_loss_type="kto",
             reference=True, tokenization="dpo", loss=kto_loss,
             metrics=("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                      "logps/rejected", "logits/chosen", "logits/rejected", "entropy"), check=check,
              paper=("KTO: Model Alignment as Prospect Theoretic Optimization", "2402.01306"))
