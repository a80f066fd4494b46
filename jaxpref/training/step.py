"""The compiled train step: policy (and reference) log-probs -> loss -> LoRA gradients -> optax.

Gradient accumulation runs inside the compiled step (`lax.scan` over micro-batches), so one host
call does one optimizer update.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxpref.data.batches import LastStep
from jaxpref.objectives.methods import LossInputs, get_method
from jaxpref.objectives.logps import pair_stats, sequence_logps, token_logps
from jaxpref.objectives.losses import LossSpec, Reduce


@dataclass(frozen=True)
class StepOptions:
    spec: LossSpec
    num_seqs: int                 # sequence slots per micro-batch (2 x pairs)
    ref_mode: str = "lora_off"    # lora_off | initial_adapter | separate | precomputed | none

    def for_batch(self, mb) -> "StepOptions":
        """A token budget's micro-batch (`data.budget`) has its own pair slots (`pair_w`)."""
        pw = getattr(mb, "pair_w", None)
        return self if pw is None else replace(self, num_seqs=2 * pw.shape[-1])


def reduce_of(mb) -> Reduce:
    """How the micro-batch's means add up to the step's (`losses.Reduce`)."""
    return Reduce(getattr(mb, "pair_w", None), getattr(mb, "ntok_c", None), getattr(mb, "ntok_full", None))


def reference_logps(opts: StepOptions, mb, ref_logps, bundle, params, ref_bundle, ref_params) -> jax.Array:
    """[S] summed reference log-probs of the micro-batch's sequences, without gradient: the base
    with the adapter off (`lora_off`), a separate frozen model, the adapter's frozen initial copy
    (`initial_adapter`, as TRL continues from an adapter), a precomputed table, or zeros (`none`)."""
    mode = opts.ref_mode
    if mode == "precomputed":
        ref = ref_logps
    elif mode == "none":
        ref = jnp.zeros((opts.num_seqs,), jnp.float32)
    elif mode == "separate":
        ref = sequence_logps(ref_bundle, ref_params, None, mb, opts.num_seqs)
    elif mode == "initial_adapter":
        ref = sequence_logps(ref_bundle, params, ref_params, mb, opts.num_seqs)
    else:
        ref = sequence_logps(bundle, params, None, mb, opts.num_seqs)
    return jax.lax.stop_gradient(ref)


def micro_loss(lora, params, mb, ref_logps: jax.Array | None, bundle, ref_bundle, ref_params,
               opts: StepOptions, rngs=None):
    """Loss and per-pair metric vectors for one micro-batch (`jaxpref.data.batches`), by the
    method's own loss (`jaxpref.objectives.methods`). A token budget's micro-batch also returns
    `_real` (1 for a pair slot in use): the step's metrics are means over those."""
    opts = opts.for_batch(mb)
    spec = opts.spec
    method = get_method(spec.method)
    coef = bundle.router_aux_coef
    stats_on = "entropy" in method.metrics   # TRL's entropy (and mean_token_accuracy): DPO's and KTO's
    out = token_logps(bundle, params, lora, mb, rngs=rngs, need_wpo=spec.use_weighting, router_aux=bool(coef),
                      need_stats=stats_on)
    logp, mean_logit, wpo = out[:3]
    stats = pair_stats(logp, mean_logit, wpo, mb, opts.num_seqs, *(out[3:5] if stats_on else ()))
    ref = None
    if method.needs_reference(spec):
        ref = reference_logps(opts, mb, ref_logps, bundle, params, ref_bundle, ref_params)
    red = reduce_of(mb)
    loss, metrics = method.loss(LossInputs(stats, ref, logp, mb, opts.num_seqs, red), spec)
    if red.pair_w is not None:   # a token budget's micro-batch: its pairs' groups' token totals
        metrics = {**metrics, "_real": (red.pair_w > 0).astype(jnp.float32), "_pair_w": red.pair_w,
                   "_group_tokens/chosen": mb.ntok_c, "_group_tokens/rejected": mb.ntok_r}
    if coef:   # as TRL: the policy forward's load-balancing loss, weighted, and logged as aux_loss
        loss = loss + coef * out[-1]
        metrics = {**metrics, "aux_loss": out[-1][None]}
    return loss, metrics


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    lora: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


# Metrics that are token means: name -> the `_tokens/` count it divides by (a method's loss gives
# per-pair sums and counts).
TOKEN_MEANS = {"logits/chosen": "chosen", "logits/rejected": "rejected", "entropy": "all",
               "mean_token_accuracy": "chosen"}


def reduce_metrics(m: dict) -> dict:
    """Per-pair metric vectors stacked over micro-batches ([G, ...]) -> scalars with TRL's
    semantics: each micro-batch's mean (`logits/*`: its token mean), averaged over the
    micro-batches, as TRL averages the values its `compute_loss` appends (`TOKEN_MEANS`). A metric with
    `_present/<name>` [G, 1] averages the micro-batches where it is present only (KTO: one without
    desirable completions appends no `rewards/chosen`), as do `logits/*` (micro-batches with
    tokens). `_count/<name>`: the micro-batch values the mean holds (`window.MetricWindow` weighs
    by it; 0: none, the metric is left out of the logged row). A token budget's micro-batches
    (`_real`) are no TRL micro-batches: means over the step's groups of pairs, a pair weighing its
    share of its group (`_pair_w`), `logits/*` over each pair's group (`_group_tokens/*`), as TRL's
    micro-batches."""
    m = dict(m)
    # (get, not pop: several metrics divide by the same count, logits/chosen and mean_token_accuracy)
    tok = {k: m["_tokens/" + side] for k, side in TOKEN_MEANS.items() if "_tokens/" + side in m and k in m}
    m = {k: v for k, v in m.items() if not k.startswith("_tokens/")}
    present = {k[len("_present/"):]: m.pop(k) for k in [k for k in m if k.startswith("_present/")]}
    real = m.pop("_real", None)
    if real is not None:   # logits/*: each pair's share of its group's token mean, over the groups
        pw = m.pop("_pair_w").reshape(-1)
        real, groups = real.reshape(-1), jnp.round(jnp.sum(pw))
        gc, gr = m.pop("_group_tokens/chosen").reshape(-1), m.pop("_group_tokens/rejected").reshape(-1)
        gtok = {k: {"chosen": gc, "rejected": gr, "all": gc + gr}[TOKEN_MEANS[k]] for k in tok}
        out = {}
        for k, v in m.items():
            v = v.reshape(-1)
            out[k] = (jnp.sum(v * real / jnp.maximum(gtok[k], 1.0)) / jnp.maximum(groups, 1e-9) if k in tok
                      else jnp.sum(v * pw) / jnp.maximum(groups, 1e-9))
            out["_count/" + k] = groups   # one value per group, as TRL's micro-batches
        return out
    out = {}
    for k, v in m.items():
        G = v.shape[0]
        v = v.reshape(G, -1)
        if k in tok:
            t = jnp.sum(tok[k].reshape(G, -1), axis=1)
            per, here = jnp.sum(v, axis=1) / jnp.maximum(t, 1.0), (t > 0).astype(jnp.float32)
        else:
            per = jnp.mean(v, axis=1)
            here = present[k].reshape(G) if k in present else jnp.ones((G,), jnp.float32)
        n = jnp.sum(here)
        out[k] = jnp.sum(per * here) / jnp.maximum(n, 1.0)
        out["_count/" + k] = n
    return out


def merge_metrics(parts: list[dict]) -> dict:
    """`reduce_metrics` of several runs of micro-batches (an epoch's last step: its whole ones and
    the shorter one) -> the step's: each metric the mean over every micro-batch it is present in."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in {k for p in parts for k in p if not k.startswith("_count/")}:
        have = [p for p in parts if k in p]
        n = sum(p["_count/" + k] for p in have)
        out[k] = sum(p[k] * p["_count/" + k] for p in have) / jnp.maximum(n, 1.0)
        out["_count/" + k] = n
    return out


def make_train_step(bundle, opts: StepOptions, optimizer: optax.GradientTransformation,
                    schedule: Callable, ref_bundle=None, dropout: bool = False,
                    full_finetune: bool = False):
    """-> step(state, params, ref_params, batch, ref_logps) -> (state, metrics), jit-compiled.

    batch: dict of [G, N, T] arrays (G micro-batches); ref_logps: [G, S] or None."""

    def loss_and_grad(lora, params, ref_params, mb, ref, rng, opts):
        rngs = {"dropout": rng} if dropout else None
        if full_finetune:
            # The trainable tree (state.lora) is the whole base tree; no adapter.
            def f(p):
                return micro_loss(None, p, mb, ref, bundle, ref_bundle, ref_params, opts, rngs)
            (loss, m), g = jax.value_and_grad(f, has_aux=True)(lora)
            return loss, m, g
        (loss, m), g = jax.value_and_grad(micro_loss, has_aux=True)(
            lora, params, mb, ref, bundle, ref_bundle, ref_params, opts, rngs)
        return loss, m, g

    def accumulate(lora, params, ref_params, batch, ref_logps, opts, rng, first: int):
        """Summed gradients and losses over the micro-batches of `batch`, and their metrics."""
        n_mb = batch.input_ids.shape[0]

        def body(carry, xs):
            gsum, lsum = carry
            mb, ref, i = xs
            run = lambda: loss_and_grad(lora, params, ref_params, mb, ref, jax.random.fold_in(rng, i), opts)
            if getattr(mb, "pair_w", None) is None:
                loss, m, g = run()
            else:   # a token budget's step may hold empty micro-batches: skipped
                none = lambda: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(run))
                loss, m, g = jax.lax.cond(jnp.any(mb.pair_w > 0), run, none)
            gsum = jax.tree_util.tree_map(jnp.add, gsum, g)
            return (gsum, lsum + loss), m

        zeros = jax.tree_util.tree_map(jnp.zeros_like, lora)
        refs = ref_logps if ref_logps is not None else jnp.zeros((n_mb, opts.for_batch(batch).num_seqs), jnp.float32)
        (gsum, lsum), ms = jax.lax.scan(body, (zeros, 0.0), (batch, refs, first + jnp.arange(n_mb)))
        return gsum, lsum, reduce_metrics(ms), n_mb

    def step(state: TrainState, params, ref_params, batch, ref_logps):
        rng = jax.random.fold_in(state.rng, state.step)
        if isinstance(batch, LastStep):
            # An epoch's last, shorter step: its whole micro-batches, then the shorter one (its own
            # sequence slots); the mean over all of them, as TRL's last accumulation.
            refs = ref_logps if ref_logps is not None else (None, None)
            parts = [(batch.head, refs[0], opts), (batch.tail, refs[1], replace(opts, num_seqs=2 * batch.pairs))]
        else:
            parts = [(batch, ref_logps, opts)]
        sums, n_mb = [], 0
        for b, ref, o in parts:
            if b is not None:
                sums.append(accumulate(state.lora, params, ref_params, b, ref, o, rng, n_mb))
                n_mb += sums[-1][3]
        # A token budget's step: the mean over its groups of pairs (each group's weights add up to 1),
        # not over its packed micro-batches.
        pw = getattr(batch, "pair_w", None)
        G = n_mb if pw is None else jnp.round(jnp.sum(pw))
        grads = jax.tree_util.tree_map(lambda *g: sum(g) / G, *[p[0] for p in sums])
        metrics = merge_metrics([p[2] for p in sums])
        metrics["loss"] = sum(p[1] for p in sums) / G
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        return TrainState(lora, opt_state, state.step + 1, state.rng), metrics

    return jax.jit(step, donate_argnums=(0,))


def compile_ahead(step_fn, *args) -> None:
    """Compile `step_fn` (jitted) for these arguments before running it, then release the
    compiler's freed memory (`host_memory.release_free_memory`), so that a new batch shape's first
    step does not hold the compiler's leftovers and the step's temporaries at once. The call that
    follows finds the compiled executable in JAX's cache."""
    from jaxpref.runtime.host_memory import release_free_memory
    step_fn.lower(*args).compile()
    release_free_memory()


def make_eval_step(bundle, opts: StepOptions, ref_bundle=None):
    """-> eval(lora, params, ref_params, batch, ref_logps) -> metrics (no update)."""

    def ev(lora, params, ref_params, batch, ref_logps):
        G = batch.input_ids.shape[0]
        refs = ref_logps if ref_logps is not None else jnp.zeros((G, opts.num_seqs), jnp.float32)

        def body(_, xs):
            mb, ref = xs
            loss, m = micro_loss(lora, params, mb, ref, bundle, ref_bundle, ref_params, opts)
            m["loss"] = jnp.broadcast_to(loss, (1,))
            return None, m

        _, ms = jax.lax.scan(body, None, (batch, refs))
        loss = jnp.mean(ms.pop("loss"))
        out = reduce_metrics(ms)
        out["loss"] = loss
        return out

    return jax.jit(ev)
