"""Every DPO-family loss equals TRL's DPOTrainer loss code on the same log-probs, gradients too.

The oracle is TRL itself: `DPOTrainer._compute_loss` driven with a stand-in model whose output
carries fixed per-token log-probs, and precomputed reference log-probs. Loss types TRL 1.x no longer
has (sigmoid with label smoothing, kto_pair) are checked against their published formulas."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl import DPOTrainer

from jaxpref.objectives.losses import LossSpec, PairStats, dpo_loss

B, T = 4, 9


class _Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


class _FakeModel(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, **kw):
        return self.out


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    comp = np.zeros((2 * B, T), np.int64)
    for i in range(2 * B):
        start = rng.integers(1, 4)
        end = rng.integers(start + 1, T + 1)
        comp[i, start:end] = 1
    tok = rng.normal(-2.0, 1.0, (2 * B, T - 1)).astype(np.float32)
    tok = (np.minimum(tok, -0.01) * comp[:, 1:]).astype(np.float32)
    lssp = rng.normal(-1.5, 0.3, (2 * B, T - 1)).astype(np.float32)
    ref = (tok.sum(1) + rng.normal(0, 2.0, 2 * B)).astype(np.float32)
    return comp, tok, lssp, ref


def trl_loss(loss_types, weights, comp, tok, lssp, ref, **attrs):
    tr = DPOTrainer.__new__(DPOTrainer)
    per_token = torch.tensor(tok, requires_grad=True)
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                          mean_logits=torch.zeros_like(per_token),
                          is_top1=torch.zeros_like(per_token, dtype=torch.bool),
                          log_sum_sq_probs=torch.tensor(lssp), aux_loss=None)
    model = _FakeModel(out)
    defaults = dict(beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
                    f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False)
    discopop_tau = attrs.pop("discopop_tau", 0.05)
    defaults.update(attrs)
    tr.__dict__.update(
        model=model, accelerator=_Acc(), aux_loss_enabled=False, precompute_ref_logps=True,
        loss_types=list(loss_types), loss_weights=list(weights), args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        **defaults)
    ids = torch.zeros((2 * B, T), dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(comp),
              "ref_chosen_logps": torch.tensor(ref[:B]), "ref_rejected_logps": torch.tensor(ref[B:])}
    loss = tr._compute_loss(model, inputs, False)
    loss.backward()
    return float(loss.detach()), per_token.grad.numpy(), {k: v[-1] for k, v in tr._metrics["train"].items()}


def ours(loss_types, weights, comp, tok, lssp, ref, **kw):
    mask = comp[:, 1:].astype(np.float32)
    lens = mask.sum(1)
    wl = ((tok - lssp) * mask).sum(1) / np.maximum(lens, 1)
    spec = LossSpec(loss_types=tuple(loss_types), loss_weights=tuple(weights), **kw)

    def f(logps):
        s = PairStats(logps[:B], logps[B:], jnp.asarray(lens[:B]), jnp.asarray(lens[B:]),
                      jnp.zeros(B), jnp.ones(B), jnp.asarray(wl[:B]), jnp.asarray(wl[B:]),
                      jnp.zeros(B), jnp.zeros(B))
        loss, m = dpo_loss(s, jnp.asarray(ref[:B]), jnp.asarray(ref[B:]), spec)
        return loss, m

    (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(tok.sum(1)))
    return float(loss), np.asarray(g), {k: float(jnp.mean(v)) for k, v in m.items()}


TRL_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


# f-divergences change the score D only, so they are crossed with the losses built on D.
CASES = [(lt, "reverse_kl") for lt in TRL_TYPES] + [
    (lt, f) for lt in ("sigmoid", "hinge", "ipo", "sigmoid_norm", "discopop")
    for f in ("forward_kl", "js_divergence", "alpha_divergence")]


@pytest.mark.parametrize("loss_type,fdiv", CASES)
def test_loss_and_grad_equal_trl(loss_type, fdiv):
    eps = 1e-3 if loss_type == "exo_pair" else (0.1 if loss_type in ("robust", "aot", "aot_unpaired") else 0.0)
    for seed in range(3):
        comp, tok, lssp, ref = _inputs(seed)
        tl, tg, tm = trl_loss([loss_type], [1.0], comp, tok, lssp, ref, label_smoothing=eps,
                              f_divergence_type=fdiv)
        ol, og, om = ours([loss_type], [1.0], comp, tok, lssp, ref, label_smoothing=eps,
                          f_divergence_type=fdiv)
        assert ol == pytest.approx(tl, rel=1e-6, abs=1e-6)
        mask = comp[:, 1:] > 0
        per_seq_trl = np.array([tg[i][mask[i]].mean() for i in range(2 * B)])
        np.testing.assert_allclose(og, per_seq_trl, rtol=1e-5, atol=1e-6)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected"):
            assert om[k] == pytest.approx(tm[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("tau", [0.02, 0.3])
def test_discopop_tau_equals_trl(tau):
    """`post_training.discopop_tau` (TRL's DPOConfig key) reaches the loss."""
    comp, tok, lssp, ref = _inputs(11)
    tl, tg, _ = trl_loss(["discopop"], [1.0], comp, tok, lssp, ref, discopop_tau=tau)
    ol, og, _ = ours(["discopop"], [1.0], comp, tok, lssp, ref, extra=(("discopop_tau", tau),))
    assert ol == pytest.approx(tl, rel=1e-6, abs=1e-6)
    default, _, _ = ours(["discopop"], [1.0], comp, tok, lssp, ref)
    assert abs(default - ol) > 1e-6  # the key changes the loss


@pytest.mark.parametrize("types,weights,wpo", [
    (["sigmoid", "sft", "bco_pair"], [1.0, 0.5, 0.25], False),
    (["sigmoid", "bco_pair"], [1.0, 0.25], True),  # TRL's WPO cannot combine with sft (in-place on an expand)
])
def test_weighted_combination_and_wpo_equal_trl(types, weights, wpo):
    comp, tok, lssp, ref = _inputs(7)
    tl, tg, _ = trl_loss(types, weights, comp, tok, lssp, ref, use_weighting=wpo)
    ol, og, _ = ours(types, weights, comp, tok, lssp, ref, use_weighting=wpo)
    assert ol == pytest.approx(tl, rel=1e-6)
    mask = comp[:, 1:] > 0
    np.testing.assert_allclose(og, [tg[i][mask[i]].mean() for i in range(2 * B)], rtol=1e-5, atol=1e-7)


def test_conservative_dpo_and_kto_pair_follow_the_reference_formulas():
    comp, tok, lssp, ref = _inputs(3)
    logps = tok.sum(1)
    rho = logps - ref
    d = rho[:B] - rho[B:]
    eps, beta = 0.2, 0.1
    logsig = lambda z: -np.log1p(np.exp(-z))
    expect = np.mean(-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d))
    ol, _, _ = ours(["sigmoid"], [1.0], comp, tok, lssp, ref, label_smoothing=eps)
    assert ol == pytest.approx(expect, rel=1e-6)
    kl_c, kl_r = max(rho[:B].mean(), 0), max(rho[B:].mean(), 0)
    sig = lambda z: 1 / (1 + np.exp(-z))
    expect = np.mean(np.concatenate([1 - sig(beta * (rho[:B] - kl_r)), 1 - sig(beta * (kl_c - rho[B:]))]))
    ol, _, _ = ours(["kto_pair"], [1.0], comp, tok, lssp, ref)
    assert ol == pytest.approx(expect, rel=1e-6)


def test_reference_free_zeroes_reference():
    comp, tok, lssp, ref = _inputs(5)
    a, _, _ = ours(["sigmoid"], [1.0], comp, tok, lssp, ref, reference_free=True)
    b, _, _ = ours(["sigmoid"], [1.0], comp, tok, lssp, np.zeros_like(ref))
    assert a == pytest.approx(b, rel=1e-7)
    assert a != pytest.approx(ours(["sigmoid"], [1.0], comp, tok, lssp, ref)[0], rel=1e-3)
