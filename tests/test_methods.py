"""Methods beyond the DPO loss table: CPO/SimPO and ORPO against TRL's loss functions, precomputed
reference log-probs, gradient accumulation, and the one-line errors for bad method settings."""
from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import write_config
from jaxpref import train
from jaxpref.objectives.losses import LossSpec, PairStats, orpo_loss, simpo_cpo_loss

B = 5


def stats(logps_c, logps_r, len_c, len_r, nll_full=None, len_full=None):
    z = jnp.zeros(B)
    return PairStats(logps_c, logps_r, jnp.asarray(len_c), jnp.asarray(len_r),
                     z if nll_full is None else nll_full, jnp.ones(B) if len_full is None else len_full,
                     z, z, z, z)


def _random(seed):
    rng = np.random.default_rng(seed)
    lc = rng.integers(1, 20, B).astype(np.float32)
    lr = rng.integers(1, 20, B).astype(np.float32)
    pc = (-rng.uniform(0.2, 3.0, B) * lc).astype(np.float32)
    pr = (-rng.uniform(0.2, 3.0, B) * lr).astype(np.float32)
    return pc, pr, lc, lr


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cpo_and_simpo_equal_trl_cpo_loss(loss_type, eps):
    from trl.experimental.cpo import CPOTrainer

    tr = CPOTrainer.__new__(CPOTrainer)
    tr.__dict__.update(alpha=0.0, beta=0.2, loss_type=loss_type, simpo_gamma=0.7, label_smoothing=eps,
                       accelerator=SimpleNamespace(device=torch.device("cpu")))
    for seed in range(3):
        pc, pr, lc, lr = _random(seed)
        avg = loss_type in ("ipo", "simpo")
        tc = torch.tensor(pc / lc if avg else pc, requires_grad=True)
        trr = torch.tensor(pr / lr if avg else pr, requires_grad=True)
        losses, rc, rr = tr.cpo_loss(tc, trr)
        # TRL: loss = mean + cpo_alpha * NLL(chosen completion tokens), cpo_alpha = 1
        nll = -torch.tensor(pc).sum() / torch.tensor(lc).sum()
        (losses.mean() + nll).backward()
        spec = LossSpec(method="cpo", loss_types=(loss_type,), beta=0.2, simpo_gamma=0.7, label_smoothing=eps,
                        cpo_alpha=1.0)

        def f(c, r):
            return simpo_cpo_loss(stats(c, r, lc, lr), spec)

        (loss, m), (gc, gr) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(pc), jnp.asarray(pr))
        assert float(loss) == pytest.approx(float(losses.mean() + nll), rel=1e-6)
        # d loss / d (summed logps): TRL's grad is w.r.t. the (possibly averaged) logps.
        nll_grad = -1.0 / lc.sum()
        expect_c = tc.grad.numpy() / (lc if avg else 1.0) + nll_grad
        expect_r = trr.grad.numpy() / (lr if avg else 1.0)
        np.testing.assert_allclose(np.asarray(gc), expect_c, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(gr), expect_r, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(m["rewards/chosen"]), rc.numpy(), rtol=1e-6)


def test_pure_simpo_has_no_nll_term():
    pc, pr, lc, lr = _random(1)
    a = simpo_cpo_loss(stats(jnp.asarray(pc), jnp.asarray(pr), lc, lr), LossSpec(method="simpo", loss_types=("simpo",)))[0]
    b = simpo_cpo_loss(stats(jnp.asarray(pc), jnp.asarray(pr), lc, lr),
                       LossSpec(method="cpo", loss_types=("simpo",), cpo_alpha=0.0))[0]
    assert float(a) == pytest.approx(float(b), rel=1e-7)


def test_orpo_equals_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    tr = ORPOTrainer.__new__(ORPOTrainer)
    tr.__dict__.update(beta=0.15, accelerator=SimpleNamespace(device=torch.device("cpu")))
    for seed in range(3):
        pc, pr, lc, lr = _random(seed)
        rng = np.random.default_rng(seed + 10)
        nll_full = rng.uniform(5, 40, B).astype(np.float32)
        len_full = rng.integers(10, 30, B).astype(np.float32)
        tc = torch.tensor(pc / lc, requires_grad=True)
        trr = torch.tensor(pr / lr, requires_grad=True)
        losses, rc, rr, ratio, log_odds = tr.odds_ratio_loss(tc, trr)
        nll = float(nll_full.sum() / len_full.sum())
        (nll - losses.mean()).backward()
        spec = LossSpec(method="orpo", loss_types=("orpo",), beta=0.15)
        s = lambda c, r: stats(c, r, lc, lr, jnp.asarray(nll_full), jnp.asarray(len_full))
        (loss, m), (gc, gr) = jax.value_and_grad(lambda c, r: orpo_loss(s(c, r), spec), argnums=(0, 1),
                                                 has_aux=True)(jnp.asarray(pc), jnp.asarray(pr))
        assert float(loss) == pytest.approx(nll - float(losses.mean()), rel=1e-6)
        np.testing.assert_allclose(np.asarray(gc), tc.grad.numpy() / lc, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(np.asarray(gr), trr.grad.numpy() / lr, rtol=1e-5, atol=1e-8)
        assert float(jnp.mean(m["log_odds_ratio"])) == pytest.approx(float(ratio), rel=1e-6)
        assert float(jnp.mean(m["log_odds_chosen"])) == pytest.approx(float(log_odds), rel=1e-6)


def _metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in l]


@pytest.mark.parametrize("batch,accum", [(2, 1), (3, 2)])
def test_precomputed_reference_equals_live_and_is_reused(tmp_path, tiny_llama, tiny_pairs, capsys, monkeypatch,
                                                         batch, accum):
    """(3, 2): 16 pairs, steps of 3 x 2; the third (the epoch's last) holds a micro-batch of 3 and one of 1."""
    monkeypatch.setenv("JAXPREF_CACHE", str(tmp_path / "cache"))

    import jaxpref.models.source as source
    monkeypatch.setattr(source, "DEFAULT_CACHE", tmp_path / "cache")
    common = dict(training={"max_steps": 3, "learning_rate": 5e-3, "per_device_train_batch_size": batch,
                            "gradient_accumulation_steps": accum, "logging_steps": 1})
    live = write_config(tmp_path / "live.yaml", tiny_llama, tiny_pairs, **common)
    pre = write_config(tmp_path / "pre.yaml", tiny_llama, tiny_pairs,
                       post_training={"method": "dpo", "beta": 0.1, "precompute_ref_logps": True}, **common)
    assert train.main(["--config", str(live), "--output-dir", str(tmp_path / "live")]) == 0
    assert train.main(["--config", str(pre), "--output-dir", str(tmp_path / "pre")]) == 0
    assert "reference log-probs of 16 pairs computed" in capsys.readouterr().err
    a, b = _metrics(tmp_path / "live" / "tiny"), _metrics(tmp_path / "pre" / "tiny")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    assert train.main(["--config", str(pre), "--output-dir", str(tmp_path / "pre2")]) == 0
    assert "reusing cached reference log-probs" in capsys.readouterr().err
    assert [r["loss"] for r in _metrics(tmp_path / "pre2" / "tiny")] == [r["loss"] for r in b]


def test_gradient_accumulation_equals_large_batch(tmp_path, tiny_llama, tiny_pairs):
    from safetensors.numpy import load_file
    runs = {}
    for name, (bs, acc) in {"big": (4, 1), "acc": (1, 4)}.items():
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_llama, tiny_pairs,
                           training={"max_steps": 2, "learning_rate": 5e-3, "per_device_train_batch_size": bs,
                                     "gradient_accumulation_steps": acc})
        assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / name)]) == 0
        runs[name] = (_metrics(tmp_path / name / "tiny"),
                      load_file(str(tmp_path / name / "tiny" / "adapter" / "adapter_model.safetensors")))
    for x, y in zip(runs["big"][0], runs["acc"][0]):
        for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k
    for k, v in runs["big"][1].items():
        np.testing.assert_allclose(v, runs["acc"][1][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pt,training,needle", [
    ({"loss_type": "exo_pair", "label_smoothing": 0.0}, {}, "exo_pair"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, {}, "robust"),
    ({"method": "kto"}, {"per_device_train_batch_size": 1}, "KTO"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, {}, "loss_weights"),
    ({"loss_type": "aot", "use_weighting": True}, {}, "use_weighting"),
    ({"loss_type": ["sigmoid", "sft"], "rpo_alpha": 0.5}, {}, "rpo_alpha"),   # was read and ignored
    ({"method": "orpo", "loss_type": "sigmoid"}, {}, "loss_type"),
])
def test_bad_method_settings_one_line(tmp_path, tiny_llama, tiny_pairs, capsys, pt, training, needle):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       post_training={"method": "dpo", "beta": 0.1, **pt}, training=training)
    code = train.main(["--config", str(cfg), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_reference_model_with_other_tokenizer_is_refused(tmp_path, tiny_llama, tiny_pairs, capsys):
    from transformers import AutoTokenizer
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       models=[{"name": "tiny", "huggingface_id": str(tiny_llama), "ref_model_id": str(other)}],
                       post_training={"method": "dpo", "beta": 0.1, "use_ref_model": True})
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different tokenizer" in err and len(err.splitlines()) == 1
