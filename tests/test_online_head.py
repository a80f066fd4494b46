"""The online methods' token log-probs and entropies (`objectives.head.completion_stats`, read by
GRPO/RLOO/online DPO's `rollouts.completion_logps` and PPO's `ppo_step.logps_values`): the model's
log-softmax at the sampling temperature as transformers computes it (Gemma 2's final-logit cap
included), and `training.vocab_chunk` visiting the vocabulary in chunks for the same numbers."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from jaxpref.objectives.head import completion_stats
from jaxpref.training.ppo_step import TEMPERATURE_EPS, init_value_head, logps_values
from jaxpref.training.rollouts import completion_logps
from conftest import head_inputs
from test_model_parity import _hf_model

V = 95


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk", [7, 32, 94])   # 94 = V - 1: a last chunk of one column
def test_vocab_chunks_give_the_whole_vocabulary(chunk, softcap):
    h, w, t = head_inputs(V)
    whole, chunked = (completion_stats(h, w, t, 0.7, c, softcap=softcap) for c in (0, chunk))
    z = np.asarray(jnp.einsum("nkd,dv->nkv", h, w, precision="highest"), np.float64)
    z = (np.tanh(z / softcap) * softcap if softcap else z) / 0.7
    logz = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    want = (np.take_along_axis(logz, np.asarray(t)[..., None], -1)[..., 0], -(np.exp(logz) * logz).sum(-1))
    for a, b, c in zip(whole, chunked, want):
        np.testing.assert_allclose(np.asarray(a), c, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    f = lambda hh, ww, c: sum(jnp.sum(x * y) for x, y in zip(completion_stats(hh, ww, t, 0.7, c, softcap=softcap),
                                                             (1.0, 0.5)))
    for a, b in zip(jax.grad(f, (0, 1))(h, w, 0), jax.grad(f, (0, 1))(h, w, chunk)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    model = _hf_model("gemma2")   # final_logit_softcapping 0.8: the cap changes every logit
    path = tmp_path_factory.mktemp("gemma2")
    model.save_pretrained(path)
    return model, path


def test_online_log_probs_are_transformers_with_the_final_logit_cap_and_vocab_chunks(gemma2):
    model, path = gemma2
    P, T = 4, 0.7
    ids = np.array([[5, 17, 33, 8, 40, 41, 3, 9, 60], [71, 12, 3, 64, 9, 8, 99, 42, 7]], np.int32)
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long)).logits.double()
    want = {}
    for temp in (T, T + TEMPERATURE_EPS):
        logz = torch.log_softmax(logits[:, P - 1:-1] / temp, -1)
        want[temp] = (torch.gather(logz, -1, torch.tensor(ids[:, P:, None], dtype=torch.long))[..., 0].numpy(),
                      -(logz.exp() * logz).sum(-1).numpy())
    valid = np.ones_like(ids)
    for chunk in (0, 7):
        bundle = build(resolve(str(path)), vocab_chunk=chunk)
        params = bundle.runtime_params(load_params(bundle))
        got = completion_logps(bundle, params, None, jnp.asarray(ids), jnp.asarray(valid), P, T)
        head = init_value_head(bundle.head(params).shape[0])
        ppo = logps_values(bundle, params, None, head, jnp.asarray(ids), valid, P, T)[:2]
        for ours, temp in ((got, T), (ppo, T + TEMPERATURE_EPS)):
            for a, b in zip(ours, want[temp]):
                np.testing.assert_allclose(np.asarray(a), b, atol=2e-5)
        # The chunks are what runs: a scan over ceil(V / chunk) vocabulary slices.
        jaxpr = str(jax.make_jaxpr(lambda p: completion_logps(bundle, p, None, jnp.asarray(ids),
                                                              jnp.asarray(valid), P, T))(params))
        n = -(-bundle.head(params).shape[1] // 7)
        assert bool(re.search(rf"length={n}\b", jaxpr)) == (chunk == 7)
