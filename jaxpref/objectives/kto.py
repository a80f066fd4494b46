"""KTO's micro-batch loss: the completions and their KL rows (`jaxpref.data.unpaired`)."""
from __future__ import annotations

import jax

from jaxpref.objectives import losses


def micro_loss_kto(st, ref: jax.Array, mb, spec, num_seqs: int):
    """st: PairStats whose 'chosen' half holds the completions and 'rejected' half the KL rows."""
    b = num_seqs // 2
    loss, m = losses.kto_loss(st.logps_chosen, ref[:b], jax.lax.stop_gradient(st.logps_rejected), ref[b:],
                              mb.labels, spec)
    labels = mb.labels
    m = dict(m)
    # Token-weighted mean logits over desirable / undesirable completions.
    m["logits/chosen"] = st.logit_sum_chosen * labels
    m["logits/rejected"] = st.logit_sum_chosen * (1 - labels)
    m["_tokens/chosen"] = st.len_chosen * labels
    m["_tokens/rejected"] = st.len_chosen * (1 - labels)
    return loss, m
