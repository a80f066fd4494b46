"""What a method is: its config keys, the data it trains on, whether it needs a reference, how it
tokenizes, and its micro-batch loss. One module per method family declares these
(`dpo`, `kto`, `orpo`, `cpo`; online: `grpo`, `rloo`, `online_dpo`, `ppo`);
`jaxpref.objectives.methods.METHODS` is the table.

Offline and online methods. An offline method's loss reads fixed data: token rows built from the
dataset (`LossInputs`). An online method (`data == "prompts"`) trains on rollouts: the loop takes a
batch of prompts, generates completions with the current adapter, scores them with the reward
functions, and only then can the loss run. So an online method declares two functions instead of
one: `score` (once per rollout batch, outside the gradient: rewards and the no-gradient log-prob
passes -> advantages and the other per-completion arrays its loss reads, plus the rollout's
metrics) and `loss` (per micro-batch of completions, inside the compiled step: `RolloutInputs`
-> loss and metrics). Its data is prompt-only (`jaxpref.data.prompts`); its tokenization is
"prompt" (TRL's GRPOTrainer) or "prompt_text" (OnlineDPOTrainer); `reference` says whether the
rollout needs reference log-probs (when beta / kl_coef is not 0). Nothing of the offline step
(`training/step.py`) runs an online method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax

from jaxpref.errors import ConfigError
from jaxpref.objectives.losses import LossSpec, PairStats, Reduce


@dataclass(frozen=True)
class LossInputs:
    """What the step hands a method's loss for one micro-batch: `stats` (per-pair sums, [B]),
    `ref` [S] float32 summed reference log-probs (chosen slots then rejected; None when the
    method needs no reference), `logp` [N, K] float32 token log-probs of the target slots, `batch`
    the micro-batch (`jaxpref.data.batches`), `num_seqs` S = 2B sequence slots, `reduce` how its
    pair and token means add up to the step's (`losses.Reduce`; a token budget's micro-batches)."""
    stats: PairStats
    ref: jax.Array | None
    logp: jax.Array
    batch: Any
    num_seqs: int
    reduce: Reduce = Reduce()


@dataclass(frozen=True)
class ScoringInputs:
    """What an online method's `score` gets for one rollout batch of N completions (rows grouped
    by prompt, G consecutive rows per prompt): `per_func` [N, F] float32 rewards (NaN: None),
    `weights` [F], `names` (the reward functions' names), `lengths` [N] generated tokens,
    `truncated` [N] bool (no EOS: cut at the length limit), `contains_eos` [N] bool, and [N, C]
    float32 over the completion slots: `mask` (completion tokens), `old_logp` (the rollout policy's
    log-probs, no gradient; None when the method does not need them), `ref_logp` (None without a
    reference pass), `values` (PPO's value head); `seq_lengths` [N] int32 last-token indices."""
    per_func: Any
    weights: Any
    names: tuple[str, ...]
    lengths: Any
    truncated: Any
    contains_eos: Any
    mask: Any
    old_logp: Any = None
    ref_logp: Any = None
    values: Any = None
    seq_lengths: Any = None


@dataclass(frozen=True)
class RolloutInputs:
    """What the step hands an online method's loss for one micro-batch of B completions, [B, C]
    float32 over the completion slots: `logp` and `entropy` of the policy being trained (logits /
    temperature, as TRL), `mask`, `old_logp` (rollout policy, no gradient; None: num_iterations 1),
    `ref_logp`, `values` (PPO's value predictions); `rollout`: the per-completion arrays `score`
    returned, sliced to these rows; `num_items`: dapo's normaliser (the step's active tokens divided
    by its micro-batches)."""
    logp: jax.Array
    entropy: jax.Array
    mask: jax.Array
    rollout: dict
    old_logp: jax.Array | None = None
    ref_logp: jax.Array | None = None
    values: jax.Array | None = None
    num_items: Any = None


@dataclass(frozen=True)
class Method:
    """A post-training method (`post_training.method`).

    keys: a dataclass of the `post_training` keys only this method reads, with their defaults
      (the config's `post_training` section is the common keys plus every method's own);
    data: "paired" (prompt, chosen, rejected), "unpaired" (prompt, completion, label) or "prompts"
      (an online method: prompts and reward columns; see the module docstring);
    loss_types / default_loss_type: the accepted `post_training.loss_type` values;
    reference: whether the loss reads reference log-probs (unless `reference_free`);
    tokenization: "dpo" (TRL DPOTrainer's / KTOTrainer's rules) or "row" (ORPOTrainer's and
      CPOTrainer's `tokenize_row`): see `jaxpref.data.trl_rules`; online: "prompt" or "prompt_text"
      (`jaxpref.data.prompts`);
    loss: (LossInputs, LossSpec) -> (scalar loss, metrics: name -> per-pair vector, plus
      `logits/*` sums and `_tokens/*` counts that the step turns into TRL's token means); online:
      (RolloutInputs, LossSpec) -> (scalar loss, metrics: name -> [1] per micro-batch);
    metrics: the names of the metrics its loss logs besides `loss` (train and, `eval_` prefixed,
      eval; `finetuning.early_stopping.metric` must name one);
    check: extra config checks (post_training section, loss types, config file) raising ConfigError;
    paper: (title, arXiv id) of the paper that introduced it, for the model card.
    defaults: TRL's defaults of the keys this method shares with others under another default
      (`beta`, `disable_dropout`; online: `temperature`, `num_generations`), given where the config
      leaves them unset;
    score: online only: (ScoringInputs, LossSpec) -> (per-completion arrays for the loss, rollout
      metrics: name -> scalar);
    kl_key: online only: the key whose value 0 skips the reference pass (`beta`, PPO's `kl_coef`).
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
    defaults: tuple[tuple[str, Any], ...] = (("beta", 0.1), ("disable_dropout", True))
    score: Callable[[ScoringInputs, LossSpec], tuple[dict, dict]] | None = None
    kl_key: str = "beta"

    @property
    def online(self) -> bool:
        return self.data == "prompts"

    def needs_reference(self, spec: LossSpec) -> bool:
        if self.online:
            return self.reference and spec.option(self.kl_key) != 0
        return self.reference and not spec.reference_free


# What every pairwise method logs (`losses.reward_metrics` and the logits means).
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


def logits_metrics(stats: PairStats) -> dict:
    """`logits/*` as per-pair sums with their token counts (the step divides them)."""
    return {"logits/chosen": stats.logit_sum_chosen, "logits/rejected": stats.logit_sum_rejected,
            "_tokens/chosen": stats.len_chosen, "_tokens/rejected": stats.len_rejected}


def entropy_metrics(stats: PairStats, accuracy: bool = True) -> dict:
    """TRL's `entropy` (over every scored completion token) and `mean_token_accuracy` (over the
    chosen ones) as per-pair sums with their token counts (the step divides them). KTO: its
    completion rows (the 'chosen' half) only, no accuracy."""
    b = stats.len_chosen.shape[0]
    if not accuracy:
        return {"entropy": stats.ent_sum[:b], "_tokens/all": stats.len_chosen}
    return {"entropy": stats.ent_sum[:b] + stats.ent_sum[b:], "_tokens/all": stats.len_chosen + stats.len_rejected,
            "mean_token_accuracy": stats.top1_sum[:b]}


def check_one_loss(pt, loss_types: tuple[str, ...], src: str, method: str, smoothed: tuple[str, ...] = ()) -> None:
    """Offline methods whose TRL trainer takes one `loss_type` (ORPO, CPO, SimPO, KTO): a list of
    loss types, `loss_weights`, or `label_smoothing` where the loss type does not read it (only
    those in `smoothed` do) would be ignored by their losses: one-line ConfigErrors."""
    if len(loss_types) != 1:
        raise ConfigError(f"{src}: `post_training.loss_type` takes one value for {method}, got {list(loss_types)}")
    if pt.loss_weights is not None:
        raise ConfigError(f"{src}: `post_training.loss_weights` would be ignored: {method} has one loss; leave it out")
    if pt.label_smoothing and loss_types[0] not in smoothed:
        why = (f"{method}'s loss_type {loss_types[0]} does not read it ({', '.join(smoothed)} do)" if smoothed
               else f"{method} has none")
        raise ConfigError(f"{src}: `post_training.label_smoothing` would be ignored: {why}; leave it out")
