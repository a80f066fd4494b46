"""Preference losses from sequence log-probabilities. Pure functions of arrays; no model, no data.

Formulas follow TRL 1.x (DPOTrainer, KTOTrainer, ORPO, CPO/SimPO) and their papers. Every
per-pair loss is averaged over the batch, then weighted and summed over `loss_types`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.nn import log_sigmoid, sigmoid

DISCOPOP_TAU = 0.05


@dataclass(frozen=True)
class LossSpec:
    method: str = "dpo"
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
    reference_free: bool = False
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    orpo_nll_span: str = "prompt_and_completion"
    # Keys of a method's own (`jaxpref.objectives.methods`) that no field above holds: (name, value).
    extra: tuple[tuple[str, object], ...] = ()

    def option(self, name: str):
        """A method key's value: a field of this spec, else one of `extra`."""
        if name in self.__dataclass_fields__:
            return getattr(self, name)
        return dict(self.extra)[name]


@jax.tree_util.register_dataclass
@dataclass
class PairStats:
    """Per-pair sums over completion tokens, all [B] float32.

    logps_*: summed token log-probs (LD-DPO weighting already applied); len_*: completion token
    counts; nll_full_chosen / len_full_chosen: NLL sum and count over prompt+completion of the
    chosen sequence (ORPO's default span); wlog_*: WPO's mean aligned log-probs (no gradient);
    logit_sum_*: summed per-token mean logits (for the logits/* metrics).
    """
    logps_chosen: jax.Array
    logps_rejected: jax.Array
    len_chosen: jax.Array
    len_rejected: jax.Array
    nll_full_chosen: jax.Array
    len_full_chosen: jax.Array
    wlog_chosen: jax.Array
    wlog_rejected: jax.Array
    logit_sum_chosen: jax.Array
    logit_sum_rejected: jax.Array
    len_all_chosen: jax.Array | None = None
    len_all_rejected: jax.Array | None = None
    ent_sum: jax.Array | None = None    # [S] summed entropies of the scored completion tokens
    top1_sum: jax.Array | None = None   # [S] scored completion tokens that are the most likely one


@dataclass(frozen=True)
class Reduce:
    """How a micro-batch's per-pair terms add up to the step's loss. Default: the micro-batch is
    one of the step's G groups of B pairs; a pair mean is `jnp.mean` and a token mean is over the
    micro-batch's tokens. Token budget (`jaxpref.data.budget`): the micro-batch holds pairs of
    several groups and empty slots; `pair_w` [B] (1/B for a pair, 1/b in a last group of b, 0 for
    an empty slot) and the group totals `ntok_c` / `ntok_full` [B] turn each mean into a sum of
    per-pair shares, so that the sums over the step's micro-batches equal the groups' means."""
    pair_w: jax.Array | None = None
    ntok_c: jax.Array | None = None
    ntok_full: jax.Array | None = None

    def mean(self, per: jax.Array) -> jax.Array:
        return jnp.mean(per) if self.pair_w is None else jnp.sum(per * self.pair_w)

    def token_mean(self, sums: jax.Array, counts: jax.Array, full: bool = False) -> tuple[jax.Array, jax.Array]:
        """Per-pair token sums [B] and counts -> (the token mean's term in the loss, a per-pair
        vector whose `mean` is that term: the metric, or an SFT loss type's per-pair values).
        `full`: counted over ORPO's span (`ntok_full`) rather than chosen completions."""
        if self.pair_w is None:
            t = jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)
            return t, jnp.broadcast_to(t, sums.shape)
        share = sums / jnp.maximum(self.ntok_full if full else self.ntok_c, 1.0)
        real = self.pair_w > 0
        return jnp.sum(share), jnp.where(real, share / jnp.where(real, self.pair_w, 1.0), 0.0)


def _scores(rho: jax.Array, spec: LossSpec) -> jax.Array:
    """f-divergence transform of a log-ratio (constants that cancel in differences dropped)."""
    kind = spec.f_divergence_type
    if kind == "reverse_kl":
        return rho
    if kind == "forward_kl":
        return 1 - jnp.exp(-rho)
    if kind == "js_divergence":
        return math.log(2) + log_sigmoid(rho)
    if kind == "alpha_divergence":
        a = spec.f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return rho
        t = jnp.minimum((a - 1.0) * rho, 80.0)
        return (jnp.exp(t) - 1.0) / (a - 1.0)
    raise ValueError(kind)


def _smoothed_sigmoid(z: jax.Array, eps: float) -> jax.Array:
    return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def dpo_per_pair(loss_type: str, s: PairStats, ref_c: jax.Array, ref_r: jax.Array,
                 spec: LossSpec, sft_loss: jax.Array) -> jax.Array:
    """One DPO-family loss type -> per-pair loss [B]."""
    beta, eps = spec.beta, spec.label_smoothing
    rho_c = s.logps_chosen - ref_c
    rho_r = s.logps_rejected - ref_r
    sc, sr = _scores(rho_c, spec), _scores(rho_r, spec)
    d = sc - sr
    lc = jnp.maximum(s.len_chosen if s.len_all_chosen is None else s.len_all_chosen, 1.0)
    lr = jnp.maximum(s.len_rejected if s.len_all_rejected is None else s.len_all_rejected, 1.0)
    if loss_type == "sigmoid":
        return _smoothed_sigmoid(beta * d, eps)
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * d)
    if loss_type == "ipo":
        return (sc / lc - sr / lr - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        z = beta * d
        return (sigmoid(z) * (log_sigmoid(z) - math.log1p(-eps))
                + sigmoid(-z) * (log_sigmoid(-z) - math.log(eps)))
    if loss_type == "nca_pair":
        return (-log_sigmoid(beta * rho_c) - 0.5 * log_sigmoid(-beta * rho_c)
                - 0.5 * log_sigmoid(-beta * rho_r))
    if loss_type == "bco_pair":
        return -log_sigmoid(beta * rho_c) - log_sigmoid(-beta * rho_r)
    if loss_type == "sppo_hard":
        return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = (jnp.sort(s.logps_chosen - s.logps_rejected)
                 - jnp.sort(ref_c - ref_r))
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type in ("aot_unpaired", "aot_pair"):
        return _smoothed_sigmoid(beta * (jnp.sort(rho_c) - jnp.sort(rho_r)), eps)
    if loss_type == "apo_zero":
        return 1 - sigmoid(beta * rho_c) + sigmoid(beta * rho_r)
    if loss_type == "apo_down":
        return sigmoid(beta * rho_c) + 1 - sigmoid(beta * (rho_c - rho_r))
    if loss_type == "discopop":
        z = beta * d
        m = sigmoid(z / dict(spec.extra).get("discopop_tau", DISCOPOP_TAU))
        return (1 - m) * (-log_sigmoid(z)) + m * jnp.exp(-z)
    if loss_type == "sigmoid_norm":
        return -log_sigmoid(beta * (sc / lc - sr / lr))
    if loss_type == "sft":
        return jnp.broadcast_to(sft_loss, rho_c.shape)
    if loss_type == "kto_pair":
        # The seed's paired KTO (older TRL): KL terms estimated from the batch, no gradient.
        kl_c = jax.lax.stop_gradient(jnp.maximum(jnp.mean(rho_c), 0.0))
        kl_r = jax.lax.stop_gradient(jnp.maximum(jnp.mean(rho_r), 0.0))
        return jnp.concatenate([1 - sigmoid(beta * (rho_c - kl_r)), 1 - sigmoid(beta * (kl_c - rho_r))])
    raise ValueError(f"unknown loss_type {loss_type}")


def sft_token_mean(s: PairStats, red: Reduce = Reduce()) -> jax.Array:
    """Token-mean NLL of the policy over the chosen completions of the batch, as per-pair values
    whose `red.mean` is that NLL (`Reduce.token_mean`)."""
    return red.token_mean(-s.logps_chosen, s.len_chosen)[1]


def dpo_loss(s: PairStats, ref_c: jax.Array, ref_r: jax.Array, spec: LossSpec,
             sft_nll: jax.Array | None = None, red: Reduce = Reduce()) -> tuple[jax.Array, dict]:
    """DPO family. s: policy stats; ref_*: reference summed log-probs [B] (zeros if reference-free).

    `sft_nll` overrides the SFT term's per-pair values (needed when LD-DPO reweights
    logps_chosen); `red`: how pair means are taken (`Reduce`)."""
    if spec.reference_free:
        ref_c, ref_r = jnp.zeros_like(ref_c), jnp.zeros_like(ref_r)
    sft = sft_token_mean(s, red) if sft_nll is None else sft_nll
    weights = None
    if spec.use_weighting:
        weights = jax.lax.stop_gradient(jnp.exp(s.wlog_chosen) * jnp.exp(s.wlog_rejected))
    loss = 0.0
    for lt, w in zip(spec.loss_types, spec.loss_weights):
        per = dpo_per_pair(lt, s, ref_c, ref_r, spec, sft)
        if weights is not None:
            per = per * (weights if per.shape == weights.shape else jnp.concatenate([weights, weights]))
        loss = loss + w * red.mean(per)
    rc = spec.beta * jax.lax.stop_gradient(s.logps_chosen - ref_c)
    rr = spec.beta * jax.lax.stop_gradient(s.logps_rejected - ref_r)
    return loss, reward_metrics(rc, rr, s)


def reward_metrics(rc: jax.Array, rr: jax.Array, s: PairStats) -> dict:
    """TRL's metric names, as per-batch sums plus counts so shards and micro-batches aggregate."""
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracies": (rc > rr).astype(jnp.float32),
        "rewards/margins": rc - rr,
        "logps/chosen": jax.lax.stop_gradient(s.logps_chosen),
        "logps/rejected": jax.lax.stop_gradient(s.logps_rejected),
    }


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -math.log(2), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(s: PairStats, spec: LossSpec, span: str = "prompt_and_completion",
              red: Reduce = Reduce()) -> tuple[jax.Array, dict]:
    """ORPO: NLL(chosen) - beta * mean(logsig(log_odds)), on length-averaged log-probs."""
    pc = s.logps_chosen / jnp.maximum(s.len_chosen, 1.0)
    pr = s.logps_rejected / jnp.maximum(s.len_rejected, 1.0)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    ratio = log_sigmoid(log_odds)
    if span == "completion":
        nll, nll_pairs = red.token_mean(-s.logps_chosen, s.len_chosen)
    else:
        nll, nll_pairs = red.token_mean(s.nll_full_chosen, s.len_full_chosen, full=True)
    loss = nll - spec.beta * red.mean(ratio)
    rc = spec.beta * jax.lax.stop_gradient(pc)
    rr = spec.beta * jax.lax.stop_gradient(pr)
    m = reward_metrics(rc, rr, s)
    # TRL's ORPO logs the length-averaged log-probs it optimises.
    m["logps/chosen"] = jax.lax.stop_gradient(pc)
    m["logps/rejected"] = jax.lax.stop_gradient(pr)
    m["nll_loss"] = jax.lax.stop_gradient(nll_pairs)
    m["log_odds_ratio"] = jax.lax.stop_gradient(ratio)
    m["log_odds_chosen"] = jax.lax.stop_gradient(log_odds)
    return loss, m


def length_averaged(method: str, loss_types) -> bool:
    """Whether the method's rewards and logged log-probs are per-token means, not sums: ORPO's
    always, CPO's for its ipo and simpo losses, and so SimPO's (TRL's ORPOTrainer and CPOTrainer)."""
    return method in ("orpo", "simpo") or (method == "cpo" and loss_types[0] in ("ipo", "simpo"))


def simpo_cpo_loss(s: PairStats, spec: LossSpec, red: Reduce = Reduce()) -> tuple[jax.Array, dict]:
    """CPO (TRL's CPOTrainer): sigmoid / hinge / ipo / simpo on policy log-probs, plus cpo_alpha
    times the chosen completions' token-mean NLL. ipo and simpo use length-averaged log-probs;
    method `simpo` is loss_type simpo with cpo_alpha = 0 (pure SimPO)."""
    eps, beta = spec.label_smoothing, spec.beta
    lt = "simpo" if spec.method == "simpo" else spec.loss_types[0]
    if length_averaged(spec.method, spec.loss_types):
        pc = s.logps_chosen / jnp.maximum(s.len_chosen, 1.0)
        pr = s.logps_rejected / jnp.maximum(s.len_rejected, 1.0)
    else:
        pc, pr = s.logps_chosen, s.logps_rejected
    logits = pc - pr
    if lt == "simpo":
        per = _smoothed_sigmoid(beta * (logits - spec.simpo_gamma / beta), eps)
    elif lt == "sigmoid":
        per = _smoothed_sigmoid(beta * logits, eps)
    elif lt == "hinge":
        per = jax.nn.relu(1 - beta * logits)
    elif lt == "ipo":
        per = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {lt} is not available for {spec.method}")
    alpha = 0.0 if spec.method == "simpo" else spec.cpo_alpha
    nll, nll_pairs = red.token_mean(-s.logps_chosen, s.len_chosen)
    if alpha == 0:
        nll, nll_pairs = jnp.zeros((), jnp.float32), jnp.zeros_like(pc)
    loss = red.mean(per) + alpha * nll
    m = reward_metrics(beta * jax.lax.stop_gradient(pc), beta * jax.lax.stop_gradient(pr), s)
    m["logps/chosen"] = jax.lax.stop_gradient(pc)
    m["logps/rejected"] = jax.lax.stop_gradient(pr)
    m["nll_loss"] = jax.lax.stop_gradient(nll_pairs)
    return loss, m


def kto_loss(logps: jax.Array, ref_logps: jax.Array, kl_logps: jax.Array, ref_kl_logps: jax.Array,
             labels: jax.Array, spec: LossSpec) -> tuple[jax.Array, dict]:
    """KTO on unpaired completions [B] with desirability labels [B] (1.0 / 0.0).

    KL = max(0, mean(kl_logps - ref_kl_logps)) over the mismatched (prompt, completion) pairs of the
    batch, without gradient. `apo_zero_unpaired` uses no KL."""
    beta = spec.beta
    rho = logps - ref_logps
    if spec.loss_types[0] == "kto":
        kl = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_logps - ref_kl_logps), 0.0))
        desirable = 1 - sigmoid(beta * (rho - kl))
        undesirable = 1 - sigmoid(beta * (kl - rho))
    else:
        kl = jnp.zeros((), jnp.float32)
        desirable = 1 - sigmoid(beta * rho)
        undesirable = sigmoid(beta * rho)
    per = jnp.where(labels > 0, spec.desirable_weight * desirable, spec.undesirable_weight * undesirable)
    loss = jnp.mean(per)
    rewards = beta * jax.lax.stop_gradient(rho)
    nc = jnp.sum(labels)
    nr = jnp.sum(1 - labels)
    mean_over = lambda x, w, n: jnp.where(n > 0, jnp.sum(x * w) / jnp.maximum(n, 1.0), 0.0)
    rc = mean_over(rewards, labels, nc)
    rr = mean_over(rewards, 1 - labels, nr)
    lp = jax.lax.stop_gradient(logps)
    m = {
        "kl": kl,
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/margins": jnp.where((nc > 0) & (nr > 0), rc - rr, 0.0),
        "logps/chosen": mean_over(lp, labels, nc),
        "logps/rejected": mean_over(lp, 1 - labels, nr),
    }
    return loss, {k: jnp.reshape(v, (1,)) for k, v in m.items()}
