"""Token and sequence log-probs from a micro-batch: the model's hidden states at the scored
positions, the LM head there (`head`), and per-pair sums (`PairStats`) in any layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.data.batches import Batch
from jaxpref.models.attention import MaskInfo
from jaxpref.objectives.head import head_logps
from jaxpref.objectives.losses import PairStats


def token_logps(bundle, params, lora, mb: Batch, rngs=None, need_wpo: bool = False, router_aux: bool = False,
                need_stats: bool = False):
    """Log-probs of the target tokens (`tgt_*`, [N, K]) given their predicting hidden states.

    The LM head runs on the K gathered positions only (`jaxpref.head`). Returns (logp, mean_logit, wpo_aligned),
    each [N, K] float32; with `need_stats` then (entropy, top1) (`head.head_logps`); with
    `router_aux` (a mixture of experts) last the forward's load-balancing loss (`ModelBundle.hidden`)."""
    mask = MaskInfo.from_batch(mb)
    if router_aux:
        hidden, aux = bundle.hidden(params, lora, mb.input_ids, mb.positions, mask, rngs=rngs, router_aux=True)
    else:
        hidden = bundle.hidden(params, lora, mb.input_ids, mb.positions, mask, rngs=rngs)
    h = jnp.take_along_axis(hidden, mb.tgt_src[..., None], axis=1)
    out = head_logps(h, bundle.head(params), mb.tgt_ids, bundle.args.vocab_chunk, need_wpo,
                     bundle.args.matmul_precision, bundle.args.spec().final_logit_softcap, need_stats)
    return (*out, aux) if router_aux else out


def _seg_sum(x: jax.Array, seq: jax.Array, s: int) -> jax.Array:
    return jax.ops.segment_sum(x.reshape(-1), seq.reshape(-1), num_segments=s + 1)[:s]


def pair_stats(logp, mean_logit, wpo, mb: Batch, num_seqs: int, ent=None, top1=None) -> PairStats:
    """Per-sequence sums of a micro-batch's target slots (`PairStats`); `ent` / `top1` ([N, K],
    `token_logps`'s `need_stats`): their sums over scored completion tokens too."""
    s = num_seqs
    b = s // 2
    seq, w = mb.tgt_seq, mb.tgt_weight
    # Scored completion tokens; a sequence without prompt also has its unscored first one
    # (`tgt_full` -1), which only TRL's completion lengths count (`len_all_*`).
    is_comp = ((seq < s) & (mb.tgt_full >= 0)).astype(jnp.float32)
    sums = _seg_sum(logp * w, seq, s)
    lens = _seg_sum(is_comp, seq, s)
    lens_all = _seg_sum((seq < s).astype(jnp.float32), seq, s)
    logit_sums = _seg_sum(mean_logit * is_comp, seq, s)
    if wpo is not None:
        wl = _seg_sum(wpo * is_comp, seq, s) / jnp.maximum(lens, 1.0)
    else:
        wl = jnp.zeros((s,), jnp.float32)
    # ORPO's span: all tokens of the chosen sequence after its first (prompt and completion),
    # marked with their pair's slot + 1 (any layout, packed rows included).
    full = mb.tgt_full
    owner = jnp.where(full > 0, full.astype(jnp.int32) - 1, b)
    in_span = (full > 0).astype(jnp.float32)
    chosen_full_nll = -_seg_sum(logp * in_span, owner, b)
    chosen_full_len = _seg_sum(in_span, owner, b)
    return PairStats(
        logps_chosen=sums[:b], logps_rejected=sums[b:],
        len_chosen=lens[:b], len_rejected=lens[b:],
        nll_full_chosen=chosen_full_nll, len_full_chosen=chosen_full_len,
        wlog_chosen=wl[:b], wlog_rejected=wl[b:],
        logit_sum_chosen=logit_sums[:b], logit_sum_rejected=logit_sums[b:],
        len_all_chosen=lens_all[:b], len_all_rejected=lens_all[b:],
        **({} if ent is None else {"ent_sum": _seg_sum(ent * is_comp, seq, s),
                                   "top1_sum": _seg_sum(top1 * is_comp, seq, s)}),
    )


def sequence_logps(bundle, params, lora, mb: Batch, num_seqs: int) -> jax.Array:
    """Summed completion log-probs [S] (chosen slots then rejected): reference / evaluation pass."""
    logp, _, _ = token_logps(bundle, params, lora, mb)
    return _seg_sum(logp * mb.tgt_weight, mb.tgt_seq, num_seqs)


