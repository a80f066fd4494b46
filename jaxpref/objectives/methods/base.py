"""What a method is: its config keys, the data it trains on, whether it needs a reference, how it
tokenizes, and its micro-batch loss. One module per method family declares these
(`dpo`, `kto`, `orpo`, `cpo`); `jaxpref.objectives.methods.METHODS` is the table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax

from jaxpref.objectives.losses import LossSpec, PairStats


@dataclass(frozen=True)
class LossInputs:
    """What the step hands a method's loss for one micro-batch: `stats` (per-pair sums, [B]),
    `ref` [S] float32 summed reference log-probs (chosen slots then rejected; None when the
    method needs no reference), `logp` [N, K] float32 token log-probs of the target slots, `batch`
    the micro-batch (`jaxpref.data.batches`), `num_seqs` S = 2B sequence slots."""
    stats: PairStats
    ref: jax.Array | None
    logp: jax.Array
    batch: Any
    num_seqs: int


@dataclass(frozen=True)
class Method:
    """A post-training method (`post_training.method`).

    keys: a dataclass of the `post_training` keys only this method reads, with their defaults
      (the config's `post_training` section is the common keys plus every method's own);
    data: "paired" (prompt, chosen, rejected) or "unpaired" (prompt, completion, label);
    loss_types / default_loss_type: the accepted `post_training.loss_type` values;
    reference: whether the loss reads reference log-probs (unless `reference_free`);
    tokenization: "dpo" (TRL DPOTrainer's / KTOTrainer's rules) or "row" (ORPOTrainer's and
      CPOTrainer's `tokenize_row`): see `jaxpref.data.trl_rules`;
    loss: (LossInputs, LossSpec) -> (scalar loss, metrics: name -> per-pair vector, plus
      `logits/*` sums and `_tokens/*` counts that the step turns into TRL's token means);
    metrics: the names of the metrics its loss logs besides `loss` (train and, `eval_` prefixed,
      eval; `finetuning.early_stopping.metric` must name one);
    check: extra config checks (post_training section, loss types, config file) raising ConfigError;
    paper: (title, arXiv id) of the paper that introduced it, for the model card.
    """
    name: str
    keys: type
    data: str
    loss_types: tuple[str, ...]
    default_loss_type: str
    reference: bool
    tokenization: str
    loss: Callable[[LossInputs, LossSpec], tuple[jax.Array, dict]]
    metrics: tuple[str, ...] = ()
    check: Callable[[Any, tuple[str, ...], str], None] | None = None
    paper: tuple[str, str] = ("", "")

    def needs_reference(self, spec: LossSpec) -> bool:
        return self.reference and not spec.reference_free


# What every pairwise method logs (`losses.reward_metrics` and the logits means).
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


def logits_metrics(stats: PairStats) -> dict:
    """`logits/*` as per-pair sums with their token counts (the step divides them)."""
    return {"logits/chosen": stats.logit_sum_chosen, "logits/rejected": stats.logit_sum_rejected,
            "_tokens/chosen": stats.len_chosen, "_tokens/rejected": stats.len_rejected}
