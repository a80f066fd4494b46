"""The online objectives (`jaxpref.objectives.online`, `.ppo`) equal TRL's own code on fixed rollouts.

GRPO and RLOO: a real `GRPOTrainer` / `RLOOTrainer` (TRL 1.16, a tiny random Llama) scores a fixed
rollout batch through its own `_generate_and_score_completions` (generation and the log-prob
passes replaced by fixed token ids and log-probs; its reward calling, advantages and metrics
untouched) and computes `_compute_loss` on it; jaxpref's reward calling, advantages, per-token
loss gradient, loss and every logged metric must match at rel 1e-5. Online DPO: the same with
`OnlineDPOTrainer.training_step`. PPO: TRL 1.16's wheel no longer ships `PPOTrainer`, so its
rollout and loss formulas (trl/experimental/ppo/ppo_trainer.py, `PPOTrainer.train`) are written
out below in torch, step by step, with TRL's own `first_true_indices` for the lengths.
"""
from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import save_tiny_llama
from jaxpref.data.prompts import decode_completions, truncated_mask
from jaxpref.data.rewards import RewardFunc, score
from jaxpref.objectives import online, ppo

jax.config.update("jax_enable_x64", False)

P, G, C = 2, 4, 6                    # prompts, generations per prompt, max_completion_length
PROMPTS = ["what is two and two ?", "what is three and four ?"]
ANSWERS = ["four", "seven"]
TEXTS = ["it is four .", "it is five .", "six six six six six six", "four",
         "seven .", "seven .", "seven .", "seven seven seven seven seven seven"]
STYLE = [0.5, None, None, 0.2, 0.3, 0.3, 0.3, 0.3]   # row 2: both functions None (unscorable)
WEIGHTS = [1.0, 0.5]


def correct(prompts, completions, answer, trainer_state, **kwargs):
    assert len(prompts) == len(completions) == len(answer) and hasattr(trainer_state, "global_step")
    return [None if "six" in c else float(a in c) for c, a in zip(completions, answer)]


def style(completions, completion_ids, **kwargs):
    assert len(completion_ids) == len(completions)
    return list(STYLE)


FUNCS = [RewardFunc("correct", "tests:correct", correct), RewardFunc("style", "tests:style", style)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    comp = []
    for t in TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"][:C]
        comp.append(ids if len(ids) == C else ids + [tok.eos_token_id])
    return path, tok, comp


def _arrays(seed: int, spread: float):
    rng = np.random.default_rng(seed)
    cur = rng.normal(-1.5, 0.6, (P * G, C)).astype(np.float32)
    old = (cur + rng.normal(0, spread, cur.shape)).astype(np.float32)
    ref = (cur + rng.normal(0, 0.3, cur.shape)).astype(np.float32)
    ent = rng.uniform(0.1, 3.0, cur.shape).astype(np.float32)
    return cur, old, ref, ent


def _build(kind: str, path, tmp, **args):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    common = dict(output_dir=str(tmp), per_device_train_batch_size=P * G, num_generations=G,
                  max_completion_length=C, report_to=[], use_cpu=True, save_strategy="no", **args)
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer
        tr = GRPOTrainer(model=str(path), reward_funcs=[correct, style], train_dataset=ds,
                         args=GRPOConfig(beta=0.04, **common))
    else:
        from trl import RLOOConfig, RLOOTrainer
        tr = RLOOTrainer(model=str(path), reward_funcs=[correct, style], train_dataset=ds,
                         args=RLOOConfig(beta=0.05, **common))
    tr.model.train()
    tr.reward_weights = torch.tensor(WEIGHTS)
    return tr


class _Fixed:
    """Stands in for generation and the log-prob passes: fixed completion ids and log-probs."""

    def __init__(self, tr, comp, cur, old, ref, ent):
        self.tr, self.comp = tr, comp
        self.cur = torch.tensor(cur, requires_grad=True)
        self.old, self.ref, self.ent = torch.tensor(old), torch.tensor(ref), torch.tensor(ent)
        self.training = False
        tr._get_per_token_logps_and_entropies = self.logps
        tr._generate_single_turn = self.generate

    def generate(self, prompt_ids, images, mm, num_generations=None):
        out = [list(c) for c in self.comp]
        return (out, None) if num_generations is not None else out

    def logps(self, model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        assert logits_to_keep == C
        if model is self.tr.ref_model:
            return self.ref, None, None
        return (self.cur, self.ent, None) if self.training else (self.old, None, None)


def _rollout(tr, fixed):
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._logs["rewards"] = defaultdict(list)
    inputs = [{"prompt": PROMPTS[p], "answer": ANSWERS[p]} for p in range(P) for _ in range(G)]
    return tr._generate_and_score_completions(inputs)


def _metrics(tr) -> dict:
    return {k: v[-1] for k, v in tr._metrics["train"].items()}


def _close(ours, theirs, what, rel=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64),
                               rtol=rel, atol=atol, err_msg=what)


def _ours_rewards(tok, comp):
    prompts = [PROMPTS[p] for p in range(P) for _ in range(G)]
    columns = {"answer": [ANSWERS[p] for p in range(P) for _ in range(G)]}
    scored = score(FUNCS, prompts, decode_completions(tok, comp, False), comp, columns)
    return scored.per_func


def _check_rollout_metrics(tok, comp, per_func, std, theirs, tr):
    ours = online.reward_metrics(per_func, jnp.asarray(WEIGHTS), [f.name for f in FUNCS], std)
    eos = [tok.eos_token_id]
    ours.update(online.completion_metrics([len(c) for c in comp], truncated_mask(comp, eos, tok.pad_token_id)))
    for k, v in ours.items():
        _close(v[0], theirs[k], k)
    for j, f in enumerate(FUNCS):   # TRL's per-function rewards, NaN for None
        _close(per_func[:, j], tr._logs["rewards"][f.name], f"rewards of {f.name}")


@pytest.fixture(scope="module")
def grpo(tiny, tmp_path_factory):
    return _build("grpo", tiny[0], tmp_path_factory.mktemp("grpo"))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_grpo_rewards_advantages_and_metrics_equal_trl(grpo, tiny, scale_rewards, mask_truncated):
    _, tok, comp = tiny
    grpo.scale_rewards, grpo.mask_truncated_completions = scale_rewards, mask_truncated
    out = _rollout(grpo, _Fixed(grpo, comp, *_arrays(0, 0.3)))
    per_func = _ours_rewards(tok, comp)
    rewards = online.combine_rewards(per_func, jnp.asarray(WEIGHTS))
    adv, std = online.grpo_advantages(rewards, G, scale_rewards)
    _close(adv, out["advantages"], "advantages")
    _check_rollout_metrics(tok, comp, per_func, std, _metrics(grpo), grpo)
    truncated = truncated_mask(comp, [tok.eos_token_id], tok.pad_token_id)
    width = max(map(len, comp))
    full = np.array([[1.0] * len(c) + [0.0] * (width - len(c)) for c in comp], np.float32)
    _close(online.loss_mask(jnp.asarray(full), truncated, mask_truncated), out["completion_mask"], "mask")


@pytest.mark.parametrize("loss_type", online.LOSS_TYPES)
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_grpo_loss_gradient_and_metrics_equal_trl(grpo, tiny, loss_type, epsilon_high):
    _, tok, comp = tiny
    for beta, bias_kl in ((0.0, True), (0.04, True), (0.04, False)):
        for with_old in (False, True):
            for mask_truncated in (False, True):
                grpo.args.use_bias_correction_kl = bias_kl
                grpo.scale_rewards, grpo.mask_truncated_completions = "group", mask_truncated
                grpo.beta, grpo.loss_type = 0.04, loss_type
                fixed = _Fixed(grpo, comp, *_arrays(1, 0.3))
                out = _rollout(grpo, fixed)
                grpo.beta = beta
                if not with_old:
                    out.pop("old_per_token_logps", None)
                else:
                    out["old_per_token_logps"] = fixed.old
                grpo.epsilon_low, grpo.epsilon_high = 0.2, 0.2 if epsilon_high is None else epsilon_high
                grpo.current_gradient_accumulation_steps = 1
                grpo._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
                fixed.training = True
                loss = grpo._compute_loss(grpo.model, out)
                loss.backward()
                mask = jnp.asarray(out["completion_mask"].numpy(), jnp.float32)

                def f(logp):
                    return online.grpo_loss(
                        logp, mask, jnp.asarray(out["advantages"].numpy()), jnp.asarray(fixed.ent.numpy()),
                        loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
                        max_completion_length=C, num_items=float(out["num_items_in_batch"]),
                        old_logp=jnp.asarray(fixed.old.numpy()) if with_old else None,
                        ref_logp=jnp.asarray(fixed.ref.numpy()) if beta else None, bias_correction_kl=bias_kl)

                (ours, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(fixed.cur.detach().numpy()))
                case = f"{loss_type} beta={beta} bias_kl={bias_kl} old={with_old} mask_truncated={mask_truncated}"
                _close(ours, loss.item(), f"loss {case}")
                _close(g, fixed.cur.grad.numpy(), f"per-token gradient {case}", atol=1e-7)
                theirs = _metrics(grpo)
                assert set(m) == set(theirs), case
                for k, v in m.items():
                    _close(v[0], theirs[k], f"{k} {case}")


def test_grpo_dapo_normalizer_over_accumulation_equals_trl(grpo, tiny):
    """With two micro-batches per step TRL divides each one's token sum by the step's tokens
    (num_items_in_batch * GA / steps_per_generation) and adds them; jaxpref divides by half of it
    and averages: the same step loss and gradient."""
    _, tok, comp = tiny
    grpo.beta, grpo.loss_type, grpo.mask_truncated_completions, grpo.scale_rewards = 0.0, "dapo", False, "group"
    fixed = _Fixed(grpo, comp, *_arrays(2, 0.3))
    out = _rollout(grpo, fixed)
    fixed.training = True
    grpo.current_gradient_accumulation_steps, grpo.args.steps_per_generation = 2, 2
    try:
        theirs = grpo._compute_loss(grpo.model, out).item()
    finally:
        grpo.current_gradient_accumulation_steps, grpo.args.steps_per_generation = 1, 1
    ours = online.grpo_loss(jnp.asarray(fixed.cur.detach().numpy()), jnp.asarray(out["completion_mask"].numpy(), jnp.float32),
                            jnp.asarray(out["advantages"].numpy()), jnp.asarray(fixed.ent.numpy()), loss_type="dapo",
                            beta=0.0, epsilon=0.2, epsilon_high=None, max_completion_length=C,
                            num_items=float(out["num_items_in_batch"]) / 2)[0]
    # TRL's micro-batch loss is summed over the 2 micro-batches, jaxpref's averaged.
    _close(ours / 2, theirs, "dapo loss of one of two micro-batches")


@pytest.fixture(scope="module")
def rloo(tiny, tmp_path_factory):
    return _build("rloo", tiny[0], tmp_path_factory.mktemp("rloo"))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_rloo_advantages_loss_and_metrics_equal_trl(rloo, tiny, normalize, epsilon_high):
    _, tok, comp = tiny
    for beta in (0.0, 0.05):
        for clip in (None, (-0.2, 0.8)):
            for mask_truncated in (False, True):
                rloo.beta, rloo.normalize_advantages, rloo.reward_clip_range = beta, normalize, clip
                rloo.mask_truncated_completions = mask_truncated
                rloo.epsilon_low, rloo.epsilon_high = 0.2, 0.2 if epsilon_high is None else epsilon_high
                fixed = _Fixed(rloo, comp, *_arrays(3, 0.05))
                out = _rollout(rloo, fixed)
                case = f"beta={beta} clip={clip} normalize={normalize} mask_truncated={mask_truncated}"
                mask = jnp.asarray(out["completion_mask"].numpy(), jnp.float32)
                per_func = _ours_rewards(tok, comp)
                rewards, kl = online.rloo_rewards(online.combine_rewards(per_func, jnp.asarray(WEIGHTS)), beta,
                                                  jnp.asarray(fixed.old.numpy()), jnp.asarray(fixed.ref.numpy()),
                                                  mask, clip)
                adv, std = online.rloo_advantages(rewards, G, normalize)
                _close(adv, out["advantages"], f"advantages {case}")
                theirs = _metrics(rloo)
                _check_rollout_metrics(tok, comp, per_func, std, theirs, rloo)
                if beta:
                    _close(kl["kl"][0], theirs["kl"], f"kl {case}")
                rloo._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
                fixed.training = True
                loss = rloo._compute_loss(rloo.model, out)
                loss.backward()

                def f(logp):
                    return online.rloo_loss(logp, mask, adv, jnp.asarray(fixed.ent.numpy()), epsilon=0.2,
                                            epsilon_high=epsilon_high, old_logps=jnp.asarray(out["old_logps"].numpy()))

                (ours, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(fixed.cur.detach().numpy()))
                _close(ours, loss.item(), f"loss {case}")
                _close(g, fixed.cur.grad.numpy(), f"gradient {case}", atol=1e-7)
                theirs = _metrics(rloo)
                assert set(m) == set(theirs), case
                for k, v in m.items():
                    _close(v[0], theirs[k], f"{k} {case}")


# ---------------------------------------------------------------------------------------------
# Online DPO: OnlineDPOTrainer.training_step on two fixed completions per prompt


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("missing_eos_penalty", [None, 0.7])
def test_online_dpo_pairs_loss_and_metrics_equal_trl(tiny, tmp_path, loss_type, missing_eos_penalty):
    """Padded completion slots hold log-prob 0 here: TRL sums `objective/kl` and
    `objective/entropy` over every slot, padding included, jaxpref over the completion tokens."""
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    path, tok, comp = tiny
    b = 4
    prompts, answers = PROMPTS * 2, ANSWERS * 2
    args = OnlineDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=b, max_new_tokens=C,
                           report_to=[], use_cpu=True, save_strategy="no", loss_type=loss_type,
                           missing_eos_penalty=missing_eos_penalty, reward_weights=WEIGHTS, beta=[0.15])
    tr = OnlineDPOTrainer(model=str(path), reward_funcs=[correct, style], args=args, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts, "answer": answers}))
    width = max(map(len, comp))
    ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in comp])
    cmask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in comp])
    cur, _, ref, _ = _arrays(4, 0.0)
    cur, ref = cur * cmask.numpy(), ref * cmask.numpy()
    cur_t = torch.tensor(cur, requires_grad=True)
    pids = torch.ones((2 * b, 3), dtype=torch.long)
    tr._generate = lambda model, ps, images=None: (pids, torch.ones_like(pids), ids, cmask, None)
    tr._forward = lambda model, *a: torch.tensor(ref) if model is tr.ref_model else cur_t
    loss = tr.training_step(tr.model, {"prompt": list(prompts), "answer": list(answers)})
    theirs = {k: v[-1] for k, v in tr.stats.items() if v}

    per_func = score(FUNCS, prompts * 2, decode_completions(tok, ids.tolist(), False), ids.tolist(),
                     {"answer": answers * 2}).per_func
    eos = np.isin(ids.numpy(), [tok.eos_token_id]).any(1)
    rewards = online.online_dpo_rewards(per_func, jnp.asarray(WEIGHTS), eos, missing_eos_penalty)
    chosen, rejected = online.online_dpo_pairs(rewards)
    order = jnp.concatenate([chosen, rejected])
    mask = jnp.asarray(cmask.numpy(), jnp.float32)

    def f(logp):
        return online.online_dpo_loss(logp[order], jnp.asarray(ref)[order], mask[order], rewards[order],
                                      eos[np.asarray(order)], beta=0.15, loss_type=loss_type)

    (ours, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(cur))
    _close(ours, loss.item() * args.gradient_accumulation_steps, "loss")
    _close(g, cur_t.grad.numpy(), "gradient", atol=1e-7)
    assert set(m) == set(theirs)
    for k, v in m.items():
        _close(v[0], theirs[k], k)


# ---------------------------------------------------------------------------------------------
# PPO: TRL's PPOTrainer.train formulas, written out in torch (TRL 1.16 no longer ships PPOTrainer)


def _trl_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _trl_masked_whiten(x, mask, shift_mean=True):
    mean = _trl_masked_mean(x, mask)
    var = _trl_masked_mean((x - mean) ** 2, mask) * (mask.sum() / (mask.sum() - 1))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def _trl_ppo_rollout(logprobs, ref_logprobs, values, scores, seq, kl_coef, kl_estimator, whiten, gamma, lam):
    """PPOTrainer.train, steps 'Response Processing 3' to '6. compute advantages and returns'."""
    t = logprobs.shape[1]
    idxs = torch.arange(t).repeat(logprobs.shape[0], 1)
    padding_mask = idxs > seq.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, ppo.INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, ppo.INVALID_LOGPROB)
    padding_mask_p1 = idxs > (seq + 1).unsqueeze(1)
    values = torch.masked_fill(values, padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    end = torch.where(seq + 1 < t, seq + 1, seq)
    rewards[torch.arange(rewards.size(0)), end] += scores
    if whiten:
        rewards = torch.masked_fill(_trl_masked_whiten(rewards, ~padding_mask_p1, shift_mean=False), padding_mask_p1, 0)
    last, rev = 0, []
    for i in reversed(range(t)):
        nextvalues = values[:, i + 1] if i < t - 1 else 0.0
        delta = rewards[:, i] + gamma * nextvalues - values[:, i]
        last = delta + gamma * lam * last
        rev.append(last)
    advantages = torch.stack(rev[::-1], axis=1)
    returns = advantages + values
    advantages = torch.masked_fill(_trl_masked_whiten(advantages, ~padding_mask), padding_mask, 0)
    return dict(logprobs=logprobs, values=values, rewards=rewards, advantages=advantages, returns=returns, kl=kl,
                non_score_reward=non_score_reward, padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)


def _trl_ppo_loss(r, new_logprobs, vpred, entropy, cliprange, cliprange_value, vf_coef):
    """PPOTrainer.train, one micro-batch of the PPO epochs."""
    new_logprobs = torch.masked_fill(new_logprobs, r["padding_mask"], ppo.INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, r["padding_mask_p1"], 0)
    vclip = torch.clamp(vpred, r["values"] - cliprange_value, r["values"] + cliprange_value)
    vf1, vf2 = torch.square(vpred - r["returns"]), torch.square(vclip - r["returns"])
    vf_loss = 0.5 * _trl_masked_mean(torch.max(vf1, vf2), ~r["padding_mask_p1"])
    diff = new_logprobs - r["logprobs"]
    ratio = torch.exp(diff)
    pg1 = -r["advantages"] * ratio
    pg2 = -r["advantages"] * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = _trl_masked_mean(torch.max(pg1, pg2), ~r["padding_mask"])
    with torch.no_grad():
        m = {"policy/approxkl_avg": 0.5 * (diff ** 2).mean(),
             "policy/clipfrac_avg": _trl_masked_mean((pg2 > pg1).float(), ~r["padding_mask"]),
             "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
             "val/clipfrac_avg": _trl_masked_mean((vf2 > vf1).float(), ~r["padding_mask_p1"]),
             "policy/entropy_avg": entropy.mean(), "val/ratio": ratio.mean()}
    return pg_loss + vf_coef * vf_loss, m


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_ppo_rewards_gae_losses_and_metrics_equal_trl_formulas(kl_estimator, whiten_rewards, gamma, lam):
    from trl.experimental.utils import first_true_indices

    rng = np.random.default_rng(5)
    b, t, pad, stop = 8, 7, 0, 2
    responses = rng.integers(3, 20, (b, t))
    for i, n in enumerate([1, 3, 7, 5, 2, 7, 4, 6]):        # response lengths; 7 = no pad
        responses[i, n - 1] = stop if n < t else responses[i, n - 1]
        responses[i, n:] = pad
    truncated = ppo.truncate_after_stop(jnp.asarray(responses), stop, pad)
    np.testing.assert_array_equal(np.asarray(truncated), responses)
    seq = first_true_indices(torch.tensor(responses) == pad) - 1
    np.testing.assert_array_equal(np.asarray(ppo.sequence_lengths(jnp.asarray(responses), pad)), seq.numpy())
    logprobs = rng.normal(-1.5, 0.5, (b, t)).astype(np.float32)
    ref = (logprobs + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    values = rng.normal(0, 1, (b, t)).astype(np.float32)
    scores = rng.normal(0, 2, b).astype(np.float32)
    kw = dict(kl_coef=0.05, kl_estimator=kl_estimator, whiten_rewards=whiten_rewards, gamma=gamma, lam=lam)
    theirs = _trl_ppo_rollout(torch.tensor(logprobs), torch.tensor(ref), torch.tensor(values), torch.tensor(scores),
                              seq, kl_coef=0.05, kl_estimator=kl_estimator, whiten=whiten_rewards, gamma=gamma, lam=lam)
    r = ppo.ppo_rollout(jnp.asarray(logprobs), jnp.asarray(ref), jnp.asarray(values), jnp.asarray(scores),
                        jnp.asarray(seq.numpy()), **kw)
    for k in ("logprobs", "values", "rewards", "advantages", "returns", "kl", "non_score_reward",
              "padding_mask", "padding_mask_p1"):
        _close(getattr(r, k), theirs[k].numpy(), k)
    new = (logprobs + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    vpred = (values + rng.normal(0, 0.4, (b, t))).astype(np.float32)
    ent = rng.uniform(0.5, 3, (b, t)).astype(np.float32)
    new_t, vpred_t = torch.tensor(new, requires_grad=True), torch.tensor(vpred, requires_grad=True)
    loss, tm = _trl_ppo_loss(theirs, new_t, vpred_t, torch.tensor(ent), 0.2, 0.2, 0.1)
    loss.backward()

    def f(n, v):
        return ppo.ppo_loss(n, v, jnp.asarray(ent), r.logprobs, r.values, r.returns, r.advantages, r.padding_mask,
                            r.padding_mask_p1, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)

    (ours, m), (gn, gv) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(new), jnp.asarray(vpred))
    _close(ours, loss.item(), "loss")
    _close(gn, new_t.grad.numpy(), "policy gradient", atol=1e-7)
    _close(gv, vpred_t.grad.numpy(), "value gradient", atol=1e-7)
    for k, v in m.items():
        _close(v[0], tm[k].item(), k)
    objective = ppo.ppo_rollout_metrics(r, int((responses == stop).sum()))
    kl_t = theirs["kl"]
    expect = {"objective/kl": kl_t.sum(1).mean(), "objective/entropy": (-theirs["logprobs"]).sum(1).mean(),
              "objective/non_score_reward": theirs["non_score_reward"].sum(1).mean(),
              "objective/scores": torch.tensor(scores).mean()}
    expect["objective/rlhf_reward"] = expect["objective/non_score_reward"] + expect["objective/scores"]
    for k, v in expect.items():
        _close(objective[k], v.item(), k)


# ---------------------------------------------------------------------------------------------
# Conversational prompts: what reward functions get, and the prompt tokens, as GRPOTrainer's


CONV = [[{"role": "user", "content": "what is two and two ?"}],
        [{"role": "system", "content": "answer with one word ."},
         {"role": "user", "content": "what is three and four ?"}]]


def _spy(calls):
    def spy(prompts, completions, completion_ids, answer, trainer_state, log_extra, log_metric, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, answer=list(answer),
                          completion_ids=[list(c) for c in completion_ids], step=trainer_state.global_step))
        log_extra("length", [len(ids) for ids in completion_ids])
        log_metric("spy/calls", float(len(calls)))
        return [float(a in c[0]["content"]) + 0.1 * len(ids)
                for c, a, ids in zip(completions, answer, completion_ids)]
    return spy


def test_conversational_prompts_tokens_and_reward_arguments_equal_trl(tiny, tmp_path):
    """A conversational dataset (message-list prompts, an `answer` column): the prompt token ids
    (chat template with the generation prompt), the keyword arguments every reward function gets
    (prompts as message lists, completions as one assistant message each, completion_ids, answer),
    what it logs (`log_extra`, `log_metric`) and the advantages equal GRPOTrainer's on the same
    completions."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from jaxpref.config.schema import DatasetConfig
    from jaxpref.data.prompts import prepare_prompts
    from jaxpref.data.rewards import TrainerState
    from jaxpref.generation.engine import DecodeOptions
    from jaxpref.training import rollouts

    path, tok, comp = tiny
    theirs_calls, ours_calls = [], []
    ds = Dataset.from_dict({"prompt": CONV, "answer": ANSWERS})
    spy = _spy(theirs_calls)
    tr = GRPOTrainer(model=str(path), reward_funcs=[spy], train_dataset=ds,
                     args=GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=P * G, num_generations=G,
                                     max_completion_length=C, report_to=[], use_cpu=True, save_strategy="no"))
    tr.model.train()
    fixed = _Fixed(tr, comp, *_arrays(6, 0.0))
    seen = {}

    def generate(ids, *a, **kw):   # records the prompt ids TRL tokenized
        seen["ids"] = [list(x) for x in ids]
        return fixed.generate(ids, *a, **kw)

    tr._generate_single_turn = generate
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._logs["rewards"] = defaultdict(list)
    out = tr._generate_and_score_completions([{"prompt": CONV[p], "answer": ANSWERS[p]}
                                              for p in range(P) for _ in range(G)])

    data = prepare_prompts(ds, DatasetConfig(name="conv"), tok)
    assert data.conversational
    rows = [p for p in range(P) for _ in range(G)]
    prompts = [data.prompt_ids[i] for i in rows]
    assert prompts == seen["ids"]
    opts = DecodeOptions(max_new_tokens=C, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    funcs = [RewardFunc("spy", "r.py:spy", _spy(ours_calls))]
    r = rollouts.assemble(tok, data, rows, prompts, comp, opts, funcs, TrainerState(0, 0.0, 1))
    assert len(ours_calls) == len(theirs_calls) == 1
    assert ours_calls[0] == theirs_calls[0]
    # What the function logged: a column of the completions table (samples.jsonl) and a metric.
    assert [r.extra(i)["extra"] for i in range(P * G)] == [{"length": n} for n in tr._logs["extra"]["length"]]
    assert {k: np.mean(v) for k, v in r.extra_metrics.items()} == {"spy/calls": _metrics(tr)["spy/calls"]}
    _close(r.per_func[:, 0], tr._logs["rewards"]["spy"], "rewards")
    adv, _ = online.grpo_advantages(online.combine_rewards(r.per_func, jnp.ones(1)), G, "group")
    _close(adv, out["advantages"], "advantages")


def test_a_full_length_completion_ending_in_the_pad_id_is_not_truncated_as_in_trl(grpo, tiny):
    """GRPOTrainer counts a completion as truncated when its last token is neither an EOS nor the
    pad id: GRPO's and RLOO's rollouts do too (`completions/clipped_ratio`,
    mask_truncated_completions; `OnlineRun._rollout` assembles them with `pad_ends`)."""
    from datasets import Dataset

    from jaxpref.config.schema import DatasetConfig
    from jaxpref.data.prompts import prepare_prompts
    from jaxpref.data.rewards import TrainerState
    from jaxpref.generation.engine import DecodeOptions
    from jaxpref.training import rollouts

    _, tok, comp = tiny
    comp = [list(c) for c in comp]
    comp[1] = comp[1][:C - 1] + [tok.pad_token_id]          # C tokens, the last one the pad id
    assert len(comp[1]) == C and tok.pad_token_id != tok.eos_token_id
    grpo.scale_rewards, grpo.mask_truncated_completions, grpo.beta = "group", True, 0.0
    out = _rollout(grpo, _Fixed(grpo, comp, *_arrays(7, 0.0)))
    data = prepare_prompts(Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}), DatasetConfig(name="p"), tok)
    rows = [p for p in range(P) for _ in range(G)]
    opts = DecodeOptions(max_new_tokens=C, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    r = rollouts.assemble(tok, data, rows, [data.prompt_ids[i] for i in rows], comp, opts, FUNCS, TrainerState(),
                          pad_ends=True)
    assert not r.truncated[1]
    ours = online.completion_metrics(r.lengths, r.truncated)
    for k, v in ours.items():
        _close(v[0], _metrics(grpo)[k], k)
    _close(online.loss_mask(jnp.asarray(r.mask[:, :out["completion_mask"].shape[1]]), r.truncated, True),
           out["completion_mask"], "mask")
