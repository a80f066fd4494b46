"""Batch layouts change the shapes, never the numbers; the iterator's state is an exact position.

`concatenated` (TRL's rows prompt+chosen, prompt+rejected) and `shared_prompt` (one row
[prompt | chosen | rejected] with a branch mask) must give the same per-sequence log-probs, DPO
loss, LD-DPO weighting and ORPO span on a tiny random Llama, and both must equal a transformers
PyTorch computation on the same tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from conftest import perturbed_llama
from jaxpref.data.batches import from_arrays
from jaxpref.data.layouts import pack_rows, Layout, compact_targets, make_pair_batch
from jaxpref.data.iterator import BatchIterator
from jaxpref.data.tokenize import Tokenized
from jaxpref.data.padfree import built_needs, to_stream
from jaxpref.lora.tree import LoraSpec, init_lora
from jaxpref.objectives.losses import LossSpec
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from jaxpref.training.step import StepOptions, micro_loss
from jaxpref.objectives.logps import pair_stats, sequence_logps, token_logps

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "checkpoints" / ".cache"
VOCAB = 128
LAYOUTS = ("concatenated", "shared_prompt", "packed", "packed_shared_prompt")
# Padding-free (`training.padding_free`): "+pf" one stream per micro-batch, "+pf2" two streams (two
# data-parallel shards).
PADDING_FREE = ("concatenated+pf", "shared_prompt+pf", "shared_prompt+pf2", "concatenated+pf2")
# (max_length, truncation_mode): untruncated; keep_start cuts completion ends; keep_end cuts
# prompt starts by different amounts for chosen and rejected (shared_prompt then places the pair
# as two segments of one row).
TRUNCATIONS = [(None, "keep_start"), (14, "keep_start"), (14, "keep_end")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bundle with LoRA scale set, params, non-zero LoRA tree, transformers model)."""
    model = perturbed_llama(VOCAB)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    bundle = build(resolve(str(path)))
    params = load_params(bundle)
    spec = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    lora = init_lora(bundle.abstract_params(), spec, jax.random.PRNGKey(1))
    flat = traverse_util.flatten_dict(lora)
    for i, k in enumerate(sorted(flat)):
        if k[-1] == "b":  # B = 0 would make the adapter a no-op
            flat[k] = 0.3 * jax.random.normal(jax.random.PRNGKey(10 + i), flat[k].shape)
    lora = traverse_util.unflatten_dict(flat)
    return bundle.with_args(lora_scale=spec.scale), params, lora, model


@pytest.fixture(scope="module")
def pairs() -> Tokenized:
    """6 pairs: prompts of 0..9 tokens (one empty), completions of 1..11, one shared completion
    prefix, one rejected longer than chosen and one shorter."""
    rng = np.random.default_rng(0)
    ids = lambda n: [int(x) for x in rng.integers(3, VOCAB, n)]
    prompt_lens = [5, 0, 9, 3, 7, 1]
    chosen_lens = [4, 6, 1, 11, 3, 8]
    rejected_lens = [7, 2, 5, 11, 9, 1]
    prompts = [ids(n) for n in prompt_lens]
    chosen = [ids(n) for n in chosen_lens]
    rejected = [ids(n) for n in rejected_lens]
    rejected[3][:4] = chosen[3][:4]
    return Tokenized(prompt=prompts, chosen=chosen, rejected=rejected, rows_in=6)


def _batch(data: Tokenized, kind: str, max_length=None, mode="keep_start", ld_alpha=None):
    """All pairs as one micro-batch. T and K are pinned so that each layout compiles once."""
    kind, padding_free, streams = kind.partition("+pf")
    layout = Layout(kind, max_length, mode, ld_alpha=ld_alpha, full_span=True)
    idx = np.arange(len(data))
    b = make_pair_batch(data, idx, layout, length=40)
    if padding_free:
        S, streams = 2 * len(idx), int(streams or 1)
        unit = compact_targets(b, S, k=40)
        L, K, Tb = built_needs(unit, S, streams)
        assert L < unit["input_ids"].size // streams  # really without padding
        mb = to_stream(unit, S, streams, 240, 240, 40, shared_prompt=kind == "shared_prompt")
        return from_arrays({k: jnp.asarray(v) for k, v in mb.items()}, kind)
    if kind.startswith("packed"):
        # Several sequences (or shared-prompt pairs) per row, block-diagonal attention.
        b = pack_rows(b, 80, 2 * len(idx), min_rows=8)
        assert (b["segment_ids"].max(axis=1) > 1).any()
    mb = compact_targets(b, 2 * len(idx), k=80 if kind.startswith("packed") else 40)
    return from_arrays({k: jnp.asarray(v) for k, v in mb.items()}, kind)


@pytest.fixture(scope="module")
def fns(tiny, pairs):
    """Jitted step functions of (lora or None, micro-batch), shared by the tests below."""
    bundle, params, _, _ = tiny
    S = 2 * len(pairs)

    def stats(lora, mb):
        logp, mean_logit, wpo = token_logps(bundle, params, lora, mb)
        return pair_stats(logp, mean_logit, wpo, mb, S)

    opts = StepOptions(LossSpec(loss_types=("sigmoid",)), S, ref_mode="lora_off")
    return {
        "logps": jax.jit(lambda lora, mb: sequence_logps(bundle, params, lora, mb, S)),
        "stats": jax.jit(stats),
        "loss": jax.jit(lambda lora, mb: micro_loss(lora, params, mb, None, bundle, None, None, opts)),
    }


def _truncated(prompt, comp, max_length, mode):
    """(token ids, prompt length) of one sequence after TRL's per-sequence truncation."""
    ids = prompt + comp
    if max_length is None or len(ids) <= max_length:
        return ids, len(prompt)
    if mode == "keep_start":
        return ids[:max_length], min(len(prompt), max_length)
    cut = len(ids) - max_length
    return ids[cut:], max(len(prompt) - cut, 0)


def _torch_logps(model, data: Tokenized, max_length, mode) -> np.ndarray:
    """Summed completion log-probs [2B] (chosen then rejected) by transformers, one sequence at a
    time without padding; a completion token at position 0 has no predictor and is not scored."""
    out = []
    for comps in (data.chosen, data.rejected):
        for p, c in zip(data.prompt, comps):
            ids, n_prompt = _truncated(p, c, max_length, mode)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            start = max(n_prompt, 1)
            out.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
    return np.asarray(out)


@pytest.mark.parametrize("max_length,mode", TRUNCATIONS)
def test_layouts_give_the_same_sequence_logps(tiny, pairs, fns, max_length, mode):
    _, _, lora, model = tiny
    got = {}
    for kind in LAYOUTS + PADDING_FREE:
        mb = _batch(pairs, kind, max_length, mode)
        got[kind] = (np.asarray(fns["logps"](None, mb)), np.asarray(fns["logps"](lora, mb)))
    (ref_c, pol_c), (ref_s, pol_s) = got["concatenated"], got["shared_prompt"]
    for kind in LAYOUTS[2:] + PADDING_FREE:
        assert np.abs(got[kind][0] - ref_c).max() <= 1e-5, kind
        assert np.abs(got[kind][1] - pol_c).max() <= 1e-5, kind
    print(f"layouts {max_length} {mode}: ref {np.abs(ref_c - ref_s).max():.1e}, "
          f"policy {np.abs(pol_c - pol_s).max():.1e}")
    assert np.abs(ref_c - ref_s).max() <= 1e-5
    assert np.abs(pol_c - pol_s).max() <= 1e-5
    assert np.abs(pol_c - ref_c).max() > 1e-2  # the LoRA really changes the policy
    theirs = _torch_logps(model, pairs, max_length, mode)
    print(f"vs transformers: {np.abs(ref_c - theirs).max():.1e}")
    assert np.abs(ref_c - theirs).max() <= 1e-4
    assert np.abs(ref_s - theirs).max() <= 1e-4


def _windowed(kind: str, window):
    """A tiny random model with a sliding window of `window` positions (None: without): Mistral's
    on every layer, or Qwen2's on layer 1 only (`max_window_layers=1`)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=window)
    return transformers.Qwen2Config(**common, use_sliding_window=window is not None, sliding_window=window,
                                    max_window_layers=1)


@pytest.mark.parametrize("arch", ["mistral", "qwen2_some_layers"])
@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (14, "keep_end")])
def test_sliding_window_in_every_layout(tmp_path, pairs, max_length, mode, arch):
    """A sliding window (4 positions, shorter than the rows) on every layer (Mistral) or on only
    some (Qwen2's `max_window_layers`: a per-layer window under the scan), in every layout,
    padding-free blocks included, equals transformers on each sequence alone."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_windowed(arch.split("_")[0], 4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    bundle = build(resolve(str(tmp_path)))
    assert bundle.args.sliding_window == 4
    assert bundle.args.sliding_layers == (() if arch == "mistral" else (False, True))
    params = load_params(bundle)
    logps = jax.jit(lambda mb: sequence_logps(bundle, params, None, mb, 2 * len(pairs)))
    theirs = _torch_logps(model, pairs, max_length, mode)
    unwindowed = transformers.AutoModelForCausalLM.from_config(_windowed(arch.split("_")[0], None)).eval()
    unwindowed.load_state_dict(model.state_dict())
    full = _torch_logps(unwindowed, pairs, max_length, mode)
    for kind in LAYOUTS + PADDING_FREE:
        ours = np.asarray(logps(_batch(pairs, kind, max_length, mode)))
        assert np.abs(ours - theirs).max() <= 1e-4, kind
    assert np.abs(theirs - full).max() > 1e-2  # the window changes these sequences


def test_layouts_give_the_same_dpo_loss(tiny, pairs, fns):
    _, _, lora, _ = tiny
    out = {}
    for kind in LAYOUTS + PADDING_FREE:
        loss, m = fns["loss"](lora, _batch(pairs, kind))
        out[kind] = (float(loss), np.asarray(m["rewards/margins"]))
    (lc, mc), (ls, ms) = out["concatenated"], out["shared_prompt"]
    assert abs(lc - ls) <= 1e-6 and np.abs(mc - ms).max() <= 1e-6
    for kind in LAYOUTS[2:] + PADDING_FREE:
        assert abs(out[kind][0] - lc) <= 1e-6 and np.abs(out[kind][1] - mc).max() <= 1e-6, kind
    assert abs(lc - np.log(2)) > 1e-3
    # At B = 0 the policy is the reference: the loss is ln 2 in both layouts.
    zero = jax.tree.map(jnp.zeros_like, lora)
    for kind in LAYOUTS:
        loss, _ = fns["loss"](zero, _batch(pairs, kind))
        assert abs(float(loss) - np.log(2)) <= 1e-6


def test_ld_alpha_weighting_is_the_same_in_both_layouts(tiny, pairs, fns):
    _, _, _, model = tiny
    alpha = 0.3
    got = {kind: np.asarray(fns["logps"](None, _batch(pairs, kind, ld_alpha=alpha))) for kind in LAYOUTS + PADDING_FREE}
    for kind in LAYOUTS[1:] + PADDING_FREE:
        assert np.abs(got["concatenated"] - got[kind]).max() <= 1e-5, kind
    # LD-DPO: the first min(|y_c|, |y_r|) tokens count fully, the rest times alpha (transformers).
    want = []
    for comps in (pairs.chosen, pairs.rejected):
        for i, (p, c) in enumerate(zip(pairs.prompt, comps)):
            ids = p + c
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            shared = min(len(pairs.chosen[i]), len(pairs.rejected[i]))
            want.append(sum((1.0 if j < shared else alpha) * float(logp[len(p) + j - 1, c[j]])
                            for j in range(len(c)) if len(p) + j > 0))
    assert np.abs(got["concatenated"] - np.asarray(want)).max() <= 1e-4


def test_orpo_full_span_is_the_same_in_both_layouts(tiny, pairs, fns):
    _, _, lora, _ = tiny
    c, s, *others = (fns["stats"](lora, _batch(pairs, kind)) for kind in LAYOUTS + PADDING_FREE)
    for other in others:
        np.testing.assert_allclose(np.asarray(other.nll_full_chosen), np.asarray(c.nll_full_chosen), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(other.len_full_chosen), np.asarray(c.len_full_chosen))
    np.testing.assert_allclose(np.asarray(c.nll_full_chosen), np.asarray(s.nll_full_chosen), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(c.len_full_chosen), np.asarray(s.len_full_chosen))
    # The span is every token of prompt+chosen after the first.
    want = [len(p) + len(ch) - 1 for p, ch in zip(pairs.prompt, pairs.chosen)]
    np.testing.assert_array_equal(np.asarray(c.len_full_chosen), want)
    for f in ("logps_chosen", "logps_rejected", "len_chosen", "len_rejected",
              "logit_sum_chosen", "logit_sum_rejected"):
        np.testing.assert_allclose(np.asarray(getattr(c, f)), np.asarray(getattr(s, f)), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Iterator


def _same(a, b) -> bool:
    a, b = a.arrays(), b.arrays()
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", LAYOUTS + PADDING_FREE)
def test_restored_iterator_continues_exactly(kind):
    rng = np.random.default_rng(1)
    ids = lambda: [int(x) for x in rng.integers(3, VOCAB, rng.integers(1, 20))]
    n = 23  # 5 steps of 2x2 pairs per epoch; 3 pairs left over, a different 3 each epoch
    data = Tokenized([ids() for _ in range(n)], [ids() for _ in range(n)], [ids() for _ in range(n)])
    kind, pf, streams = kind.partition("+pf")
    layout = Layout(kind, 32, buckets=(16, 32, 64), padding_free=bool(pf), streams=int(streams or 1))
    steps = 13  # crosses two epoch boundaries
    base = BatchIterator(data, 2, 2, seed=7, layout=layout)
    want = [next(base) for _ in range(steps)]
    assert base.epoch == 2
    assert not _same(want[0][0], want[5][0])  # epochs are shuffled differently
    for stop in range(steps):
        it = BatchIterator(data, 2, 2, seed=7, layout=layout)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
        fresh = BatchIterator(data, 2, 2, seed=7, layout=layout)
        fresh.restore(state)
        for k in range(stop, steps):
            batch, progress = next(fresh)
            assert _same(batch, want[k][0]) and progress == want[k][1], (stop, k)


@pytest.fixture(scope="module")
def quickstart():
    """The quickstart config with its data tokenized by SmolLM2's tokenizer (both cached)."""
    from jaxpref.config import load_config
    from jaxpref.data import prepare
    from jaxpref.models.source import load_tokenizer

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    try:
        src = resolve(cfg.models[0].huggingface_id, cache_root=CACHE)
    except Exception as e:
        pytest.skip(f"SmolLM2 unavailable ({e})")
    tok = load_tokenizer(src)
    return cfg, tok, prepare


@pytest.mark.parametrize("kind", LAYOUTS + PADDING_FREE[:2])
def test_quickstart_epoch_compiles_few_shapes(quickstart, kind):
    cfg, tok, prepare = quickstart
    cfg.training.pair_layout, pf, _ = kind.partition("+pf")
    cfg.training.padding_free = bool(pf)
    cfg.training.max_length = 128
    cfg.training.per_device_train_batch_size = 4
    cfg.training.gradient_accumulation_steps = 1
    prepared = prepare.data_for(cfg, tok, cache_root=CACHE)
    it = BatchIterator(prepared.train, 4, 1, cfg.training.seed, prepared.layout)
    shapes = set()
    for _ in range(it.steps_per_epoch):
        batch, _ = next(it)
        shapes.add(tuple(sorted((k, v.shape) for k, v in batch.arrays().items())))
    print(f"quickstart {kind}: {len(shapes)} shapes over {it.steps_per_epoch} steps")
    assert it.steps_per_epoch >= 50
    assert len(shapes) <= 4
