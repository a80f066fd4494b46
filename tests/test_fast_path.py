"""The speed/memory switches change how the step runs, never its numbers.

- `LlamaArgs.recompute_activations` (on by default) recomputes the SwiGLU product and the
  attention core in the backward pass instead of storing them: the losses, metrics and LoRA
  gradients must equal the plain path's (stored activations) on the same batches, in fp32 to
  1e-5, through whole optimizer steps with gradient accumulation, and the compiled step must
  need less temporary memory.
- The `shared_prompt` layout with planned batch shapes (`BatchIterator.plan_shapes`, the default
  when `training.length_buckets` is unset) trains to the same losses, metrics and LoRA as the
  plain path (TRL's concatenated rows, fixed buckets) on the same pairs, to 1e-5 in fp32.
- The LM head in vocabulary chunks (`training.vocab_chunk`) gives the whole-vocabulary head's
  log-probs, mean logits, WPO terms and gradients, and trains to the same losses, in less memory.
- bf16 compute (`training.compute_dtype: bfloat16`) must run through the same step. On a CPU its
  matmuls widen bf16 operands to fp32 (faster there): that must equal bf16 products accumulated in
  fp32, to bf16's rounding.
- The allocator settings (`jaxpref.runtime.host_memory.tune_malloc`) are off by default and on with
  JAXPREF_MALLOC_TUNING=1 (glibc Linux).
"""
from __future__ import annotations

import collections
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import head_inputs, perturbed_llama
from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import Layout
from jaxpref.config import TrainingConfig
from jaxpref.data.tokenize import Tokenized
from jaxpref.lora.tree import LoraSpec, init_lora
from jaxpref.objectives.losses import LossSpec
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from jaxpref.training.step import StepOptions, TrainState, make_train_step, micro_loss
from jaxpref.training.optim import make_optimizer

VOCAB = 96
B, G = 3, 2
SPEC = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = perturbed_llama(VOCAB, intermediate_size=96, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama_fast")
    model.save_pretrained(path)
    return path


def bundles(model_dir, compute_dtype="float32"):
    """(plain bundle, fast bundle, params) for one compute dtype."""
    base = build(resolve(str(model_dir)), "float32", compute_dtype)
    params = load_params(base)
    base = base.with_args(lora_scale=SPEC.scale)
    return base.with_args(recompute_activations=False), base.with_args(recompute_activations=True), params


def nonzero_lora(bundle):
    """PEFT init has B = 0 (the adapter is a no-op); random B makes policy != reference."""
    flat = traverse_util.flatten_dict(init_lora(bundle.abstract_params(), SPEC, jax.random.PRNGKey(1)))
    for i, k in enumerate(sorted(flat)):
        if k[-1] == "b":
            flat[k] = 0.2 * jax.random.normal(jax.random.PRNGKey(10 + i), flat[k].shape)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def pairs() -> Tokenized:
    rng = np.random.default_rng(0)
    ids = lambda n: [int(x) for x in rng.integers(3, VOCAB, n)]
    n = 12
    return Tokenized(prompt=[ids(int(rng.integers(1, 10))) for _ in range(n)],
                     chosen=[ids(int(rng.integers(1, 12))) for _ in range(n)],
                     rejected=[ids(int(rng.integers(1, 12))) for _ in range(n)], rows_in=n)


def batches(pairs, kind: str, count: int) -> list[dict]:
    layout = Layout(kind, None, "keep_start", buckets=(32,), full_span=False, target_buckets=(16,))
    it = BatchIterator(pairs, B, G, 0, layout)
    return [next(it)[0] for _ in range(count)]


def test_recompute_activations_keeps_loss_metrics_and_grads_in_less_memory(model_dir, pairs):
    plain, fast, params = bundles(model_dir)
    lora = nonzero_lora(plain)
    opts = StepOptions(LossSpec(loss_types=("sigmoid",)), 2 * B, ref_mode="lora_off")
    data = batches(pairs, "concatenated", 2)
    mbs = [batch.micro(g) for batch in data for g in range(G)]

    def compiled(bundle):
        f = lambda lo, mb: micro_loss(lo, params, mb, None, bundle, None, None, opts)
        return jax.jit(jax.value_and_grad(f, has_aux=True)).lower(lora, mbs[0]).compile()

    f_plain, f_fast = compiled(plain), compiled(fast)
    for mb in mbs:
        (l0, m0), g0 = f_plain(lora, mb)
        (l1, m1), g1 = f_fast(lora, mb)
        assert abs(float(l0) - float(l1)) <= 1e-5
        assert abs(float(l0) - np.log(2)) > 1e-3  # the adapter is active: a real test
        for k in m0:
            np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), atol=1e-5, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)
    # The point of the switch: fewer stored activations.
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    assert temp(f_fast) < temp(f_plain)


def _train(bundle, params, lora, data: list[dict]):
    tcfg = TrainingConfig(learning_rate=1e-2, lr_scheduler_type="constant")
    opt, schedule = make_optimizer(tcfg, len(data))
    step = make_train_step(bundle, StepOptions(LossSpec(loss_types=("sigmoid",)), 2 * B), opt, schedule)
    lora = jax.tree_util.tree_map(jnp.copy, lora)  # the step donates its state
    state = TrainState(lora, opt.init(lora), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))
    out = []
    for batch in data:
        state, m = step(state, params, None, batch, None)
        out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return out, jax.device_get(state.lora)


def assert_same_run(m0, lora0, m1, lora1):
    """Every logged metric within 1e-5 (relative above 1) and the trained LoRA within 1e-5."""
    for a, b in zip(m0, m1):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), k
    for a, b in zip(jax.tree_util.tree_leaves(lora0), jax.tree_util.tree_leaves(lora1)):
        np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.fixture(scope="module")
def fp32_runs(model_dir, pairs):
    """Three optimizer steps (2 micro-batches each) on the plain and on the fast path."""
    plain, fast, params = bundles(model_dir)
    # An adapter already away from the reference: with PEFT's B = 0 every reward margin of step 1
    # is exactly 0 on the plain path and a rounding-level +-1e-9 on the others, so
    # `rewards/accuracies` (a strict >) would compare rounding noise, which varies with the CPU.
    lora = nonzero_lora(plain)
    data = batches(pairs, "concatenated", 3)
    return data, lora, _train(plain, params, lora, data), _train(fast, params, lora, data)


def test_train_steps_match_plain_path(fp32_runs):
    _, _, (m0, lora0), (m1, lora1) = fp32_runs
    assert abs(m0[0]["loss"] - np.log(2)) > 1e-3  # the adapter is active from step 1
    assert min(abs(m["rewards/margins"]) for m in m0) > 1e-4  # accuracies are not decided by rounding
    assert m0[-1]["loss"] < m0[0]["loss"] - 1e-3  # training moved
    assert_same_run(m0, lora0, m1, lora1)


def test_shared_prompt_with_planned_shapes_trains_like_the_plain_path(model_dir, pairs, fp32_runs):
    data, lora, (m0, lora0), _ = fp32_runs
    _, fast, params = bundles(model_dir)
    it = BatchIterator(pairs, B, G, 0, Layout("shared_prompt", None, "keep_start", full_span=False))
    shapes = it.plan_shapes(3, lambda T, K: T * 10 + K, max_shapes=2)
    fast_data = [next(it)[0] for _ in range(3)]
    assert {(b.input_ids.shape[-1], b.tgt_ids.shape[-1]) for b in fast_data} <= set(shapes)
    assert all(f.input_ids.shape[1] == B and d.input_ids.shape[1] == 2 * B
               for f, d in zip(fast_data, data))
    m1, lora1 = _train(fast, params, lora, fast_data)
    assert_same_run(m0, lora0, m1, lora1)


@pytest.mark.parametrize("kind", ["shared_prompt", "concatenated"])
def test_padding_free_trains_like_the_plain_path(model_dir, pairs, fp32_runs, kind):
    """Rows end to end in one stream per micro-batch, each row attending only to itself, the
    sequences' last tokens left out: the same losses, metrics and LoRA as padded rows."""
    data, lora, (m0, lora0), _ = fp32_runs
    _, fast, params = bundles(model_dir)
    it = BatchIterator(pairs, B, G, 0, Layout(kind, None, "keep_start", full_span=False, padding_free=True))
    shapes = it.plan_shapes(3, lambda L, K, Tb: L * 10 + K + Tb * Tb, max_shapes=2)
    fast_data = [next(it)[0] for _ in range(3)]
    padded = BatchIterator(pairs, B, G, 0, Layout(kind, None, "keep_start", full_span=False))
    for f in fast_data:
        d, _ = next(padded)
        L, K, Tb = f.input_ids.shape[-1], f.tgt_ids.shape[-1], f.blk_idx.shape[-1]
        assert (L, K, Tb) in shapes and f.input_ids.shape[1] == 1
        real = (d.segment_ids > 0).sum(axis=(1, 2))
        # Padding gone, and the two sequences' last tokens of every pair left out.
        np.testing.assert_array_equal((f.segment_ids > 0).sum(axis=(1, 2)), real - 2 * B)
        assert f.trl_token_count() == d.trl_token_count()
    m1, lora1 = _train(fast, params, lora, fast_data)
    assert_same_run(m0, lora0, m1, lora1)


@pytest.mark.parametrize("softcap", [None, 2.0])   # Gemma 2's final-logit cap (logits ~N(0, 16) here)
@pytest.mark.parametrize("chunk", [7, 32, 95])   # 95 = V - 1: a last chunk of one column
def test_vocab_chunks_give_the_whole_head(chunk, softcap):
    from jaxpref.objectives.head import head_logps
    h, w, t = head_inputs(VOCAB)
    whole, chunked = (head_logps(h, w, t, c, need_wpo=True, softcap=softcap, need_stats=True) for c in (0, chunk))
    assert len(whole) == len(chunked) == 5
    for a, b in zip(whole, chunked):   # logp, mean logit, WPO's term, entropy, top-1
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    logits = np.asarray(jnp.einsum("nkd,dv->nkv", h, w, precision="highest"))
    logits = logits if softcap is None else np.tanh(logits / softcap) * softcap
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(whole[3]), -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked[4]), (logits.argmax(-1) == np.asarray(t)).astype(np.float32))
    f = lambda hh, ww, c: sum(jnp.sum(x * y) for x, y in zip(head_logps(hh, ww, t, c, softcap=softcap)[:2],
                                                             (1.0, 0.5)))
    for a, b in zip(jax.grad(f, (0, 1))(h, w, 0), jax.grad(f, (0, 1))(h, w, chunk)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    big = jax.ShapeDtypeStruct((8, 256, 16), jnp.float32), jax.ShapeDtypeStruct((16, 4096), jnp.float32), \
        jax.ShapeDtypeStruct((8, 256), jnp.int32)
    loss = lambda c: lambda hh, ww, tt: jnp.sum(head_logps(hh, ww, tt, c, softcap=softcap)[0])
    temp = lambda c: jax.jit(jax.grad(loss(c))).lower(
        *big).compile().memory_analysis().temp_size_in_bytes
    assert temp(512) < temp(0) / 2


def test_vocab_chunked_head_trains_like_the_whole_head(model_dir, fp32_runs):
    data, lora, (m0, lora0), _ = fp32_runs
    plain, _, params = bundles(model_dir)
    m1, lora1 = _train(plain.with_args(vocab_chunk=40), params, lora, data)
    assert_same_run(m0, lora0, m1, lora1)


def _f32_products(bundle, params, lora, mb, opts) -> collections.Counter:
    """(precision, algorithm) of every fp32 dot_general in the lowered step's StableHLO: what XLA
    is asked for, whatever the backend it then compiles for."""
    f = lambda lo, mb: micro_loss(lo, params, mb, None, bundle, None, None, opts)
    text = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(lora, mb).as_text()
    found = collections.Counter()
    for line in text.splitlines():
        if "stablehlo.dot_general" in line and re.search(r"-> tensor<[^>]*xf32>", line):
            prec = re.search(r"precision = \[([A-Z]+), ([A-Z]+)\]", line)
            algo = re.search(r"algorithm = <lhs_precision_type = (\w+), rhs_precision_type = (\w+)", line)
            found[(prec.groups() if prec else None, algo.groups() if algo else None)] += 1
    return found


@pytest.mark.parametrize("attention", ["xla", "xla_chunked", "flash"])
def test_fp32_step_asks_for_fp32_products_everywhere(model_dir, pairs, attention):
    """`compute_dtype: float32` is fp32 on every backend: each fp32 product of the step (policy and
    reference forward, backward, LM head, loss; shared-prompt rows, every attention backend) asks
    for HIGHEST precision or the F32_F32_F32 algorithm. XLA's DEFAULT is TF32 on a GPU (the model
    parity tests failed there with 9.5e-4). `training.matmul_precision: tf32` asks for TF32 (HIGH)."""
    _, fast, params = bundles(model_dir)
    lora = nonzero_lora(fast)
    opts = StepOptions(LossSpec(loss_types=("sigmoid",)), 2 * B, ref_mode="lora_off")
    mb = batches(pairs, "shared_prompt", 1)[0].micro(0)
    exact = _f32_products(fast.with_args(attention=attention), params, lora, mb, opts)
    fp32 = {(("HIGHEST", "HIGHEST"), None), (("DEFAULT", "DEFAULT"), ("f32", "f32"))}
    assert sum(exact.values()) >= 40 and set(exact) <= fp32, exact
    tf32 = _f32_products(fast.with_args(attention=attention, matmul_precision="tf32"), params, lora, mb, opts)
    assert sum(tf32.values()) == sum(exact.values())
    assert tf32[(("HIGH", "HIGH"), None)] == exact[(("HIGHEST", "HIGHEST"), None)], tf32


def test_bf16_matmul_on_cpu_is_fp32_accumulation_of_bf16_products():
    from jaxpref.models.layers import matmul, upcast_on_cpu
    assert upcast_on_cpu(jnp.bfloat16) == (jax.default_backend() == "cpu")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 7, 300)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((300, 40)), jnp.float32)
    ours = matmul("btd,do->bto", x, w, jnp.bfloat16, jnp.float32)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    exact = np.einsum("btd,do->bto", np.asarray(xb, np.float64), np.asarray(wb, np.float64))
    np.testing.assert_allclose(np.asarray(ours), exact, rtol=1e-5, atol=1e-4)  # fp32 accumulation
    native = jnp.einsum("btd,do->bto", xb, wb, preferred_element_type=jnp.float32, precision="highest")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(native), rtol=1e-5, atol=1e-4)
    rounded = matmul("btd,do->bto", x, w, jnp.bfloat16)
    assert rounded.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(rounded, np.float32), exact, rtol=2 ** -8, atol=1e-2)


def test_bf16_compute_runs_the_same_step(model_dir, fp32_runs):
    data, lora, _, (m32, _) = fp32_runs
    _, fast16, params16 = bundles(model_dir, "bfloat16")
    m16, lora16 = _train(fast16, params16, lora, data)
    for a, b in zip(m32, m16):
        assert np.isfinite(b["loss"]) and abs(a["loss"] - b["loss"]) < 0.05
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(lora16))


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt only")
def test_malloc_tuning_is_opt_in():
    code = "from jaxpref.runtime.host_memory import tune_malloc; print(tune_malloc())"
    env = dict(os.environ)
    env.pop("JAXPREF_MALLOC_TUNING", None)
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["JAXPREF_MALLOC_TUNING"] = "1"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")
