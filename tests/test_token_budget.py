"""`training.max_tokens_per_batch`: a step's pairs packed into padding-free micro-batches of at most
that many tokens (`jaxpref.data.budget`) train exactly as the same config without the key: the same
pairs per optimizer step, the same losses, metrics and LoRA updates (fp32, 1e-5), in fewer
forward passes for short pairs and one compiled shape; bad values are one-line errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import perturbed_llama
from jaxpref.config import TrainingConfig, config_from_dict
from jaxpref.data.budget import BudgetIterator, balanced, first_fit
from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import Layout
from jaxpref.data.tokenize import Tokenized
from jaxpref.errors import ConfigError
from jaxpref.lora.tree import LoraSpec, init_lora
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from jaxpref.objectives.losses import LossSpec
from jaxpref.training.optim import make_optimizer
from jaxpref.training.step import StepOptions, TrainState, make_train_step

VOCAB = 96
B, G, STEPS = 3, 2, 2
SPEC = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_budget")
    perturbed_llama(VOCAB, intermediate_size=96, tie_word_embeddings=True).save_pretrained(path)
    bundle = build(resolve(str(path)), "float32", "float32").with_args(lora_scale=SPEC.scale)
    params = load_params(bundle)
    flat = traverse_util.flatten_dict(init_lora(bundle.abstract_params(), SPEC, jax.random.PRNGKey(1)))
    for i, k in enumerate(sorted(flat)):   # policy != reference from step 1
        if k[-1] == "b":
            flat[k] = 0.2 * jax.random.normal(jax.random.PRNGKey(10 + i), flat[k].shape)
    return bundle, params, traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def pairs() -> Tokenized:
    rng = np.random.default_rng(3)
    ids = lambda n: [int(x) for x in rng.integers(3, VOCAB, n)]
    n = 12
    return Tokenized(prompt=[ids(int(rng.integers(1, 10))) for _ in range(n)],
                     chosen=[ids(int(rng.integers(1, 14))) for _ in range(n)],
                     rejected=[ids(int(rng.integers(1, 14))) for _ in range(n)], rows_in=n)


def layout(kind: str, full_span: bool, max_tokens=None) -> Layout:
    return Layout(kind, None, "keep_start", full_span=full_span, padding_free=True, max_tokens=max_tokens)


def train(bundle, params, lora, data, spec: LossSpec):
    # SGD: the LoRA after the steps differs by the learning rate times the gradients' difference.
    opt, schedule = make_optimizer(TrainingConfig(learning_rate=0.1, optimizer="sgd", lr_scheduler_type="constant",
                                                  max_grad_norm=1.0), len(data))
    step = make_train_step(bundle, StepOptions(spec, 2 * B, ref_mode="lora_off" if spec.method in ("dpo", "ipo")
                                               else "none"), opt, schedule)
    lora = jax.tree_util.tree_map(jnp.copy, lora)
    state = TrainState(lora, opt.init(lora), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))
    out = []
    for batch in data:
        state, m = step(state, params, None, batch.on_device(), None)
        out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return out, jax.device_get(state.lora), step._cache_size()


def same_training(m0, lora0, m1, lora1) -> None:
    """Every step's metrics (the same names) within 1e-5, and the LoRA after the steps within 1e-5."""
    for a, b in zip(m0, m1):
        assert set(a) == set(b)
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for a, b in zip(jax.tree_util.tree_leaves(lora0), jax.tree_util.tree_leaves(lora1)):
        np.testing.assert_allclose(b, a, atol=1e-5)


SPECS = {
    "dpo_rpo": LossSpec(loss_types=("sigmoid", "sft"), loss_weights=(1.0, 0.5)),
    "dpo_wpo_ipo": LossSpec(loss_types=("ipo", "hinge"), loss_weights=(1.0, 0.3), use_weighting=True),
    "orpo": LossSpec(method="orpo", loss_types=("orpo",)),
    "cpo": LossSpec(method="cpo", loss_types=("sigmoid",), cpo_alpha=1.0),
}


@pytest.mark.parametrize("kind", ["shared_prompt", "concatenated"])
@pytest.mark.parametrize("name", list(SPECS))
def test_token_budget_trains_like_the_same_config_without_it(model, pairs, kind, name):
    bundle, params, lora = model
    spec = SPECS[name]
    full = spec.method == "orpo"
    plain = BatchIterator(pairs, B, G, 0, layout(kind, full))
    plain.plan_shapes(STEPS, lambda L, K, Tb: L + K + Tb, max_shapes=1)
    it = BudgetIterator(pairs, B, G, 0, layout(kind, full, max_tokens=0))
    # A budget that holds a whole step: the pairs of both groups share one micro-batch.
    budget = B * G * it.longest_pair()
    it = BudgetIterator(pairs, B, G, 0, layout(kind, full, max_tokens=budget))
    it.plan_shapes(STEPS)
    data0 = [next(plain)[0] for _ in range(STEPS)]
    data1 = [next(it)[0] for _ in range(STEPS)]
    used = []
    for d0, d1 in zip(data0, data1):
        real = np.asarray(d1.pair_w) > 0
        used.append(int(real.any(axis=-1).sum()))
        assert real.sum() == B * G                               # the same pairs per step
        assert (np.asarray(d1.segment_ids) > 0).sum(axis=(1, 2)).max() <= budget
        assert d1.trl_token_count() == d0.trl_token_count()      # the same tokens
    assert max(used) < G                                         # fewer forward passes
    assert len({d.shape_key for d in data1}) == 1                # one compiled shape
    m0, lora0, _ = train(bundle, params, lora, data0, spec)
    m1, lora1, compiles = train(bundle, params, lora, data1, spec)
    assert compiles == 1
    assert abs(m0[0]["loss"] - m0[-1]["loss"]) > 1e-4           # training moved
    same_training(m0, lora0, m1, lora1)


def test_a_budget_of_one_pair_needs_more_micro_batches_and_skips_empty_ones(model, pairs):
    """The budget at the longest pair: some micro-batches hold one pair, steps differ in how many
    they need; the compiled shape holds the most and the step skips the empty ones."""
    bundle, params, lora = model
    spec = SPECS["dpo_rpo"]
    it = BudgetIterator(pairs, B, G, 0, layout("shared_prompt", False, max_tokens=0))
    it = BudgetIterator(pairs, B, G, 0, layout("shared_prompt", False, max_tokens=it.longest_pair()))
    it.plan_shapes(STEPS)
    it.plan = (it.plan[0] + 1, *it.plan[1:])   # room for one more: every step holds an empty one
    data1 = [next(it)[0] for _ in range(STEPS)]
    plain = BatchIterator(pairs, B, G, 0, layout("shared_prompt", False))
    data0 = [next(plain)[0] for _ in range(STEPS)]
    used = [int((np.asarray(d.pair_w) > 0).any(axis=-1).sum()) for d in data1]
    assert min(used) > G and max(used) < data1[0].input_ids.shape[0]
    m0, lora0, _ = train(bundle, params, lora, data0, spec)
    m1, lora1, _ = train(bundle, params, lora, data1, spec)
    same_training(m0, lora0, m1, lora1)


def test_first_fit_packs_by_decreasing_size_within_the_capacity():
    bins = first_fit([5, 3, 9, 2, 4], 10)
    assert bins == [[2], [0, 4], [1, 3]]   # 9 | 5 4 | 3 2
    assert first_fit([], 4) == []
    # The same number of bins filled evenly (largest first into the emptiest), or None if it overfills.
    assert balanced([5, 3, 9, 2, 4], 3, 10) == [[2], [0, 3], [1, 4]]   # 9 | 5 2 | 4 3
    assert balanced([6, 6, 4, 4], 2, 10) == [[0, 2], [1, 3]]
    assert balanced([7, 7, 3, 3], 2, 9) is None


def test_the_memory_plan_models_one_micro_batch_of_the_budget(model, pairs):
    """The plan's activations follow the stream the step runs (L tokens of one micro-batch), not
    the step's pairs: a larger budget, a larger plan; more accumulation, the same."""
    from jaxpref.runtime.memory import memory_plan

    bundle = model[0]
    cfg = config_from_dict({**BASE, "training": {"max_tokens_per_batch": 4096}}, "c.yaml")
    n = 24   # pairs of one size: 6 prompt + 2 x 5 completion tokens, 14 in a stream
    same = Tokenized(prompt=[[5 + i % 7] * 6 for i in range(n)], chosen=[[7] * 5] * n, rejected=[[9] * 5] * n,
                     rows_in=n)

    def plan(budget, accum):
        it = BudgetIterator(same, B, accum, 0, layout("shared_prompt", False, max_tokens=budget))
        assert it.longest_pair() == 14
        it.plan_shapes(2)
        keys = it.shape_keys(accum)
        assert keys[0][2] <= budget
        return keys[0], memory_plan(cfg, bundle.args, 10**6, 10**3, keys, runtime=0)["activations"]

    (k1, small), (k2, large) = plan(28, 1), plan(42, 1)
    assert (k1[0], k1[2], k2[0], k2[2]) == (2, 28, 1, 42)   # 3 pairs: 2 + 1 micro-batches, or one
    assert small < large
    k4, same_plan = plan(28, 4)
    assert k4[0] == 6 and same_plan == small                # 12 pairs: 6 micro-batches of the same stream


BASE = {"models": [{"name": "m", "huggingface_id": "some/model"}], "dataset": {"name": "d.jsonl"}}


@pytest.mark.parametrize("training, post, message", [
    ({"max_tokens_per_batch": 0}, {}, "must be a positive number of tokens, got 0"),
    ({"max_tokens_per_batch": -5}, {}, "must be a positive number of tokens"),
    ({"max_tokens_per_batch": 4096, "padding_free": False}, {}, "needs `training.padding_free` true or auto"),
    ({"max_tokens_per_batch": 4096, "pair_layout": "packed"}, {}, "not `pair_layout: packed`"),
    ({"max_tokens_per_batch": 4096}, {"method": "kto"}, "not kto"),
    ({"max_tokens_per_batch": 4096}, {"loss_type": "aot"}, "does not apply to loss_type aot"),
    ({"max_tokens_per_batch": 4096}, {"precompute_ref_logps": True}, "precompute_ref_logps"),
])
def test_bad_token_budgets_are_one_line_errors(training, post, message):
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict({**BASE, "training": training, "post_training": post}, "c.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("c.yaml: `training.max_tokens_per_batch`")


def test_a_budget_below_the_longest_pair_is_a_one_line_error(pairs):
    from jaxpref.training.setup import train_iterator

    cfg = config_from_dict({**BASE, "training": {"max_tokens_per_batch": 8}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"max_tokens_per_batch` 8 is smaller than the longest pair \(\d+ tokens"):
        train_iterator(cfg, pairs, B, G, layout("shared_prompt", False, max_tokens=8))
    assert train_iterator(cfg, pairs, B, G, layout("shared_prompt", False, max_tokens=200)).budget == 200
    cfg.training.max_length = None
    with pytest.raises(ConfigError, match=r"longest pair \(\d+ tokens with no max_length\); raise it to at least \d+ or "
                                          r"set `training.max_length`$"):
        train_iterator(cfg, pairs, B, G, layout("shared_prompt", False, max_tokens=8))


def test_the_cli_run_and_its_dry_run_with_a_token_budget(tmp_path, tiny_llama, tiny_pairs, capsys):
    """Whole runs: the same logged losses and metrics as without the key; the dry run prints the
    micro-batch plan and plans the memory of one micro-batch of the budget's tokens; a budget
    below the longest pair is one line, exit 2."""
    import json

    from conftest import write_config
    from jaxpref import train

    def run(name, *extra, **training):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_llama, tiny_pairs,
                           training={"max_steps": 2, "per_device_train_batch_size": 2,
                                     "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
                                     "max_length": 64, "logging_steps": 1, "seed": 0, **training})
        code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / name), *extra])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("dry", "--dry-run", max_tokens_per_batch=256)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.strip().startswith("micro-batches"))
    assert "max_tokens_per_batch 256:" in line and "micro-batches per step" in line
    code, out, err = run("small", "--dry-run", max_tokens_per_batch=9)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "max_tokens_per_batch` 9 is smaller than the longest pair" in err
    rows = {}
    for name, extra in (("plain", {}), ("budget", {"max_tokens_per_batch": 256})):
        code, _, err = run(name, **extra)
        assert code == 0, err
        rows[name] = [json.loads(l) for l in (tmp_path / name / "tiny" / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in l and "eval_loss" not in l]
    assert len(rows["plain"]) == len(rows["budget"]) == 2
    for a, b in zip(rows["plain"], rows["budget"]):
        for k in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                  "logits/chosen", "logits/rejected", "num_tokens"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])


@pytest.mark.parametrize("name", ["dpo_rpo", "orpo"])
def test_an_epochs_last_shorter_step_trains_like_the_same_config_without_it(model, pairs, name):
    """10 pairs in steps of 2 x 3: the second step holds groups of 3 and 1 (`batches.LastStep`
    without the key): the same losses, metrics and LoRA with a budget holding the whole step."""
    bundle, params, lora = model
    spec = SPECS[name]
    full = spec.method == "orpo"
    ten = Tokenized(prompt=pairs.prompt[:10], chosen=pairs.chosen[:10], rejected=pairs.rejected[:10], rows_in=10)
    plain = BatchIterator(ten, B, G, 0, layout("shared_prompt", full), last_short=True)
    it = BudgetIterator(ten, B, G, 0, layout("shared_prompt", full, max_tokens=0))
    it = BudgetIterator(ten, B, G, 0, layout("shared_prompt", full, max_tokens=B * G * it.longest_pair()),
                        last_short=True)
    assert plain.steps_per_epoch == it.steps_per_epoch == 2
    data0 = [next(plain)[0] for _ in range(2)]
    data1 = [next(it)[0] for _ in range(2)]
    assert data0[1].pairs == 1 and (np.asarray(data1[1].pair_w) > 0).sum() == 4
    m0, lora0, _ = train(bundle, params, lora, data0, spec)
    m1, lora1, _ = train(bundle, params, lora, data1, spec)
    same_training(m0, lora0, m1, lora1)
