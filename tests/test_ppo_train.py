"""PPO (`jaxpref.training.ppo_loop`, `ppo_step`): the value head on the policy body and the first
mini-batch's losses, metrics and gradients equal TRL's PPOTrainer formulas computed in torch on the
same model (a PEFT adapter, a value head on the last hidden state) for a fixed rollout; a run from
the command line with TRL's metric names, a PEFT adapter and the value head beside it; bad PPO keys
as one-line errors."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_config
from online_fixtures import ppo_setup, train_ok, train_refused  # noqa: F401  (the module fixture)

PROMPTS = [[1, 14, 11, 24, 15, 24], [1, 11, 28, 32], [1, 14, 11, 12, 13, 11, 31], [1, 11, 25, 27]]
COMPLETIONS = [[10, 29, 2], [30, 31, 32, 33, 34, 35], [2], [36, 29, 40, 2]]   # 2: EOS; the second fills C
SCORES = [1.5, -0.5, 0.25, 2.0]
C, TEMPERATURE = 6, 0.7


@pytest.fixture(scope="module")
def peft_tiny(tmp_path_factory, tiny_llama):
    """The tiny llama with a non-zero PEFT LoRA (q_proj, v_proj) saved beside it."""
    import copy

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("ppo_peft")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    torch.manual_seed(4)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0)).eval()
    pm.save_pretrained(d / "adapter")
    return pm, d / "adapter"


def _rollout_rows(pad: int):
    """Prompts left-padded to P, completions right-padded to C (the rollout's layout)."""
    P = max(map(len, PROMPTS))
    ids = np.full((len(PROMPTS), P + C), pad, np.int64)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids[i, P - len(p):P] = p
        ids[i, P:P + len(c)] = c
    return ids, P


def _trl_forward(pm, head, ids, P, pad, adapter=True):
    """TRL's `forward` (pad-masked attention, exclusive-cumsum positions) -> log-probs of
    logits / (T + 1e-7), entropies and the value head on hidden_states[-1] at [P - 1 : -1]."""
    import contextlib

    import torch

    ids = torch.tensor(ids)
    mask = ids != pad
    pos = mask.cumsum(1) - mask.long()
    ctx = contextlib.nullcontext() if adapter else pm.disable_adapter()
    with ctx:
        out = pm(input_ids=torch.masked_fill(ids, ~mask, 0), attention_mask=mask, position_ids=pos,
                 output_hidden_states=True)
    logits = out.logits[:, P - 1:-1] / (TEMPERATURE + 1e-7)
    logp = torch.gather(logits.log_softmax(-1), 2, ids[:, P:, None])[..., 0]
    entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
    values = out.hidden_states[-1][:, P - 1:-1] @ head
    return logp, entropy, values


def test_ppo_first_mini_batch_equals_trl_on_a_fixed_rollout(tiny_llama, peft_tiny):
    import torch
    from test_online_trl import _trl_ppo_loss, _trl_ppo_rollout

    from jaxpref.lora.peft import load_adapter
    from jaxpref.models.source import resolve
    from jaxpref.models.weights import build, load_params
    from jaxpref.objectives import ppo
    from jaxpref.objectives.losses import LossSpec
    from jaxpref.objectives.methods import get_method
    from jaxpref.objectives.methods.base import ScoringInputs
    from jaxpref.training.ppo_step import LOSS_KEYS, make_ppo_step, make_rollout_pass, mini_batch
    from jaxpref.training.step import TrainState

    pm, adapter_dir = peft_tiny
    pad, eos = 0, 2
    ids, P = _rollout_rows(pad)
    torch.manual_seed(7)
    head_t = (0.3 * torch.randn(64)).requires_grad_(True)
    # TRL: rollout log-probs and values (adapter on), reference (adapter off), response processing.
    with torch.no_grad():
        old_t, _, values_t = _trl_forward(pm, head_t, ids, P, pad)
        ref_t, _, _ = _trl_forward(pm, head_t, ids, P, pad, adapter=False)
    responses = torch.tensor(ids[:, P:])
    seq = (responses == pad).int().argmax(1) - 1
    seq = torch.where((responses == pad).any(1), seq, C - 1)
    scores = torch.tensor(SCORES) - 1.0 * ~(responses == eos).any(1)          # missing_eos_penalty 1.0
    opts = dict(kl_coef=0.2, kl_estimator="k3", gamma=0.95, lam=0.9, whiten_rewards=False, cliprange=0.2,
                cliprange_value=0.2, vf_coef=0.1, missing_eos_penalty=1.0)
    theirs = _trl_ppo_rollout(old_t, ref_t, values_t, scores, seq, 0.2, "k3", False, 0.95, 0.9)
    # Ours: the same model, adapter and head.
    bundle = build(resolve(str(tiny_llama)))
    lora, spec = load_adapter(adapter_dir, bundle, bundle.abstract_params())
    bundle = bundle.with_args(lora_scale=spec.scale, deterministic=True)
    params = bundle.runtime_params(load_params(bundle))
    trainable = {"lora": lora, "value_head": jnp.asarray(head_t.detach().numpy())}
    jids, valid = jnp.asarray(ids, jnp.int32), jnp.asarray(ids != pad, jnp.int32)
    old, ref, values = make_rollout_pass(bundle, TEMPERATURE)(params, trainable, jids, valid, P)
    # Equal where TRL reads them (the slots past them hold pads, which its forward masks).
    keep, keep_p1 = ~theirs["padding_mask"].numpy(), ~theirs["padding_mask_p1"].numpy()
    for ours, want, where in ((old, old_t, keep), (ref, ref_t, keep), (values, values_t, keep_p1)):
        np.testing.assert_allclose(np.asarray(ours)[where], want.numpy()[where], rtol=1e-5, atol=1e-5)
    method = get_method("ppo")
    lspec = LossSpec(method="ppo", loss_types=("ppo",), loss_weights=(1.0,), extra=tuple(opts.items()))
    contains = jnp.any(jids[:, P:] == eos, axis=1)
    x = ScoringInputs(per_func=jnp.asarray(SCORES)[:, None], weights=jnp.ones(1), names=("f",),
                      lengths=None, truncated=~contains, contains_eos=contains, mask=None, old_logp=old,
                      ref_logp=ref, values=values, seq_lengths=ppo.sequence_lengths(jids[:, P:], pad))
    scored, objective = method.score(x, lspec)
    for k in ("advantages", "returns", "rewards", "values"):
        np.testing.assert_allclose(np.asarray(scored[k]), theirs[k].numpy(), rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(float(objective["objective/kl"]), theirs["kl"].sum(1).mean().item(), rtol=1e-5)
    # One mini-batch of two micro-batches (rows 2, 0 | 3, 1): TRL's losses on each, gradients averaged.
    opt = __import__("optax").sgd(1.0)
    state = TrainState(trainable, opt.init(trainable), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))
    step = make_ppo_step(bundle, method, lspec, opt, TEMPERATURE)
    arrays = dict({k: scored[k] for k in LOSS_KEYS}, ids=jids, valid=valid)
    order = [2, 0, 3, 1]
    _, m = step(state, params, mini_batch(arrays, order, 2), P=P)
    total = 0
    for i, rows in enumerate((order[:2], order[2:])):
        new_t, ent_t, vpred_t = _trl_forward(pm, head_t, ids[rows], P, pad)
        r = {k: v[rows] for k, v in theirs.items()}
        loss, tm = _trl_ppo_loss(r, new_t, vpred_t, ent_t, 0.2, 0.2, 0.1)
        total = total + loss / 2
        for k, v in tm.items():
            # TRL's entropy mean takes in the padding slots, whose hidden states differ (ppo_step)
            rtol = 2e-2 if k == "policy/entropy_avg" else 1e-5
            np.testing.assert_allclose(float(m[k][i]), v.item(), rtol=rtol, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(float(m["loss"][i]), loss.item(), rtol=1e-5)
    total.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_" in n] + [head_t.grad]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    assert norm > 1e-3
    np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-4)


TRL_METRICS = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
               "loss/value_avg", "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var",
               "val/num_eos_tokens", "lr", "episode", "eps"}


def _config(d, model, post=None, training=None, lora=None):
    pt = {"method": "ppo", "beta": None, "reward_funcs": ["rewards.py:digit_share", "rewards.py:wants_answer"],
          "reward_weights": [1.0, 0.5], "response_length": 6, "stop_token": "eos", "num_ppo_epochs": 2,
          "num_mini_batches": 2, "missing_eos_penalty": 1.0, "temperature": 1.0, **(post or {})}
    tr = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
          "learning_rate": 1.0e-2, "logging_steps": 1, "seed": 0, "max_prompt_length": 32, **(training or {})}
    return write_config(d / "ppo.yaml", model, d / "prompts.jsonl", post_training=pt, training=tr,
                        **({"lora": lora} if lora else {}))


@pytest.mark.slow
def test_ppo_trains_from_the_cli(tmp_path, ppo_setup, tiny_llama, capsys):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    cfg = _config(ppo_setup, tiny_llama, training={"lr_scheduler_type": "linear"})
    run_dir, metrics, samples = train_ok(cfg, tmp_path / "out", capsys)
    assert [m["step"] for m in metrics] == [1, 2]
    m1, m2 = metrics
    assert TRL_METRICS | {"time/generate", "time/update"} <= set(m1)
    first = [s for s in samples if s["step"] == 0]
    assert len(first) == 4 and len(samples) == 8                 # 2 x 2 prompts, one completion each
    # scores: the weighted rewards, minus missing_eos_penalty where the completion has no EOS
    for s in first:
        want = sum(w * (v or 0.0) for w, v in zip((1.0, 0.5), s["rewards"].values()))
        assert s["score"] == pytest.approx(want - (1.0 if s["truncated"] else 0.0), abs=1e-6)
    assert m1["objective/scores"] == pytest.approx(np.mean([s["score"] for s in first]), rel=1e-5, abs=1e-6)
    # Step 1 samples with the zero adapter: the policy is the reference, KL 0, and the first
    # mini-batch's ratio is 1; the later three (2 epochs x 2 mini-batches) moved it.
    assert m1["objective/kl"] == 0.0 and m1["objective/rlhf_reward"] == m1["objective/scores"]
    assert m1["val/ratio_var"] > 0 and m1["loss/value_avg"] > 0
    assert m2["objective/kl"] != 0.0
    # the learning rate moves once per rollout batch (linear over 2 batches), whatever its 4 updates
    assert (m1["lr"], m2["lr"]) == (pytest.approx(1.0e-2), pytest.approx(5.0e-3))
    assert (m1["episode"], m2["episode"], m2["epoch"]) == (4, 8, pytest.approx(8 / 6, abs=1e-4))
    head = load_file(run_dir / "value_head.safetensors")["score.weight"]
    assert head.shape == (1, 64) and np.abs(head).max() > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # the report after the run: PPO's own metrics in its row, its reward and KL curves drawn
    assert (tmp_path / "out" / "report_curves.png").is_file()
    row = next(x for x in (tmp_path / "out" / "report.md").read_text().splitlines() if x.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "ppo" and float(cells[6]) > 0, cells          # wall s: train_runtime
    assert f"objective/scores {m2['objective/scores']:.4g}" in cells[-1], cells[-1]


@pytest.mark.parametrize("post, training, needle", [
    ({"num_mini_batches": 3}, {}, "not a multiple of `post_training.num_mini_batches` 3"),
    ({"kl_estimator": "k2"}, {}, "kl_estimator"),
    ({"num_ppo_epochs": 0}, {}, "num_ppo_epochs` must be >= 1"),
    ({"stop_token_id": 2}, {}, "not both"),
    ({"stop_token": None, "stop_token_id": 100000}, {}, "`post_training.stop_token_id` 100000 is not a token id"),
    ({"stop_token": None, "stop_token_id": -1}, {}, "`post_training.stop_token_id` -1 is not a token id"),
    ({"whiten_rewards": True}, {}, "whiten_rewards` needs mini-batches of at least 8"),
    ({"beta": 0.1}, {}, "kl_coef"),
    ({}, {"per_device_train_batch_size": 4}, "fewer than one rollout batch"),
    # read and never applied otherwise: PPO's passes run without dropout, as TRL's
    ({"lora": {"lora_dropout": 0.1}}, {}, "`lora.lora_dropout` 0.1: ppo trains without dropout"),
])
def test_bad_ppo_keys_are_one_line_errors(tmp_path, ppo_setup, tiny_llama, capsys, post, training, needle):
    lora = post.pop("lora", None)
    train_refused(_config(ppo_setup, tiny_llama, post, training, lora), tmp_path / "out", capsys, [needle])


@pytest.mark.slow
def test_ppo_on_8_virtual_devices_gives_the_single_device_numbers(tmp_path, ppo_setup, tiny_llama):  # noqa: F811
    """Two rollout batches of 8 prompts (2 micro-batches of 4 rows, 2 epochs x 2 mini-batches an
    update) on one device and on a data 2 x fsdp 2 x tensor 2 mesh of 8 virtual CPU devices
    (subprocesses): the same completions, scores, values, losses and metrics."""
    from online_fixtures import one_device_and_mesh, write_prompts_and_rewards

    write_prompts_and_rewards(ppo_setup, 16, "prompts16.jsonl")
    pt = {"method": "ppo", "beta": None, "reward_funcs": ["rewards.py:digit_share", "rewards.py:wants_answer"],
          "response_length": 6, "stop_token": "eos", "num_ppo_epochs": 2, "num_mini_batches": 2,
          "missing_eos_penalty": 1.0, "temperature": 1.0}
    runs = one_device_and_mesh(tmp_path, ppo_setup, tiny_llama, pt, (4, 1), {"data": 2, "fsdp": 2, "tensor": 2},
                               prompts="prompts16.jsonl", gradient_accumulation_steps=2)
    assert len(runs["one"]) == len(runs["mesh"]) == 2 and runs["one"][1]["objective/kl"] != 0.0
    for a, b in zip(runs["one"], runs["mesh"]):
        assert b["episode"] == a["episode"]
        for k in TRL_METRICS - {"eps", "episode", "val/num_eos_tokens"}:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
        assert b["val/num_eos_tokens"] == a["val/num_eos_tokens"]


@pytest.mark.parametrize("prompts, batch, accum, epochs", [(6, 2, 2, 1.0), (10, 4, 1, 2.5), (16, 2, 4, 1.0),
                                                            (9, 1, 2, 0.5)])
def test_ppo_rollout_batches_from_num_epochs_are_trls(ppo_setup, tiny_llama, prompts, batch, accum, epochs):  # noqa: F811
    """TRL's PPOTrainer counts its updates in episodes: total_episodes = int(num_train_epochs x
    dataset rows), num_total_batches = ceil(total_episodes / batch_size), its dataloader cycling
    (epochs drop their last partial batch). jaxpref's rollout batches from `training.num_epochs`
    (no max_steps) are that count, whatever the remainder of an epoch."""
    import math

    from jaxpref.config import load_config
    from jaxpref.training.online_plan import plan

    cfg = load_config(_config(ppo_setup, tiny_llama, {"num_mini_batches": 1}, {
        "max_steps": -1, "num_epochs": epochs, "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum}))
    trl_batch_size = batch * accum                          # per_device x world_size (1) x accumulation
    want = math.ceil(int(epochs * prompts) / trl_batch_size)
    assert plan(cfg, 1, prompts).total == want


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad_0", "pad_is_eos"])
def test_a_reward_model_scores_the_policys_ids_as_trls_ppo_get_reward(tmp_path, pad_is_eos):
    """TRL's PPOTrainer scores `query + postprocessed_response` (the policy's own ids) with its
    reward model through `get_reward`: every pad-id token out of attention (the prompt's left
    padding, and pad ids inside a prompt), exclusive-cumsum positions, the score read at the
    response's last token before its first pad. jaxpref's PPO rollout gives a reward model entry
    the same ids (`reward_model_scores`), a reward function's column kept beside it; a reward model
    of another vocabulary is refused in one line."""
    import types

    import torch
    from test_reward_model import save_reward_model
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.utils import get_reward

    from jaxpref.data.rewards import RewardFunc, load_reward_func
    from jaxpref.errors import ConfigError
    from jaxpref.objectives import ppo
    from jaxpref.training.ppo_loop import check_reward_models, reward_model_scores

    path = save_reward_model(tmp_path / "rm", pad_is_eos=pad_is_eos)
    pad, eos = (2, 2) if pad_is_eos else (0, 2)
    prompts = [[1, 14, 11, 24, 15, 24], [1, 11, 28, 32], [1, 14, pad, 12, 13, 11, 31], [1, 11, 25, 27]]
    completions = [[10, 29, 2, 7], [30, 31, 32, 33, 34, 35], [2], [36, 29, 40, 2]]   # EOS mid, none, first, last
    P = max(map(len, prompts))
    query = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    responses = torch.tensor([c + [pad] * (C - len(c)) for c in completions])
    post = ppo.truncate_after_stop(jnp.asarray(responses.numpy()), eos, pad)        # stop_token: eos
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32).eval()
    with torch.no_grad():
        want = get_reward(model, torch.cat([query, torch.tensor(np.asarray(post))], 1), pad, P)[1].numpy()
    rm = load_reward_func("rm", tmp_path)
    fn = RewardFunc("f", "r.py:f", lambda **kw: None)
    got = reward_model_scores([fn, rm], [1], np.full((4, 1), 0.5, np.float32), prompts, np.asarray(post), pad)
    assert np.ptp(want) > 1e-3
    np.testing.assert_array_equal(got[:, 0], 0.5)
    np.testing.assert_allclose(got[:, 1], want, rtol=0, atol=1e-5)
    # GRPO's text path (prompt + decoded completion, retokenised; what PPO used before) scores otherwise
    dec = lambda ids: rm.fn.tok.decode(ids, skip_special_tokens=True)
    text = rm.fn(prompts=[dec(p) for p in prompts], completions=[dec(c) for c in np.asarray(post).tolist()])
    assert np.abs(np.asarray(text) - want).max() > 1e-3
    cfg = types.SimpleNamespace(source="c.yaml")
    check_reward_models(cfg, [fn, rm], rm.fn.tok)
    with pytest.raises(ConfigError, match="reward model `rm`: ppo scores the policy's token ids"):
        check_reward_models(cfg, [fn, rm], types.SimpleNamespace(get_vocab=lambda: {"a": 0}))
