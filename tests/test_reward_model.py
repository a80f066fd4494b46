"""Reward models in `post_training.reward_funcs`: a tiny random LlamaForSequenceClassification
saved with transformers, read into our model with its score head, scores as TRL's GRPOTrainer
computes them (`_calculate_rewards`, the model loaded as its `__init__` loads a reward model
entry); a GRPO run names it as TRL does; folders that are not one-label reward models are
refused in one line."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_tokenizer, write_config
from jaxpref.data.rewards import load_reward_func
from online_fixtures import train_ok, train_refused


def save_reward_model(path: Path, num_labels: int = 1, pad_is_eos: bool = False, seed: int = 0) -> Path:
    """A 2-layer Llama with a `score` head of `num_labels`, every weight moved off its init."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tokenizer(path)
    if pad_is_eos:   # TRL then pools before a trailing EOS (it is the pad id)
        tok.pad_token = tok.eos_token
        tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, num_labels=num_labels, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def trl_rewards(path: Path, prompts: list, completions: list) -> tuple[str, np.ndarray]:
    """(TRL's name for the reward model, its rewards) from GRPOTrainer's own code: the entry
    loaded as `GRPOTrainer.__init__` loads one, scored by `GRPOTrainer._calculate_rewards`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOTrainer
    from trl.trainer.utils import get_config_model_id

    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(get_config_model_id(model.config))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    name = get_config_model_id(model.config).split("/")[-1]
    tr = GRPOTrainer.__new__(GRPOTrainer)
    tr.__dict__.update(reward_funcs=[model], reward_processing_classes=[tok], reward_func_names=[name],
                       environments=None, chat_template_kwargs={}, is_deepspeed_enabled=False,
                       state=SimpleNamespace(global_step=0),
                       accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
                       args=SimpleNamespace(device=torch.device("cpu"), report_to=[]),
                       _log_completion_extra=lambda *a: None, _log_metric=lambda *a: None)
    inputs = [{"prompt": p} for p in prompts]
    out = tr._calculate_rewards(inputs, prompts, completions, [[0]] * len(prompts))
    return name, out[:, 0].numpy()


STANDARD = (["what is two and two ?", "is the sky blue ?", "hello", "what is the opposite of hot ?"],
            [" it is four .", " yes", " world , we are happy and the sun is hot .", " cold </s>"])
CHAT = ([[{"role": "user", "content": "what is two and two ?"}],
         [{"role": "system", "content": "answer yes or no ."}, {"role": "user", "content": "is the sky blue ?"}],
         [{"role": "user", "content": "hello"}]],
        [[{"role": "assistant", "content": "it is four ."}], [{"role": "assistant", "content": "yes"}],
         [{"role": "assistant", "content": "world , we are happy and the sun is hot ."}]])


@pytest.mark.parametrize("data, pad_is_eos", [(STANDARD, False), (CHAT, False), (STANDARD, True)],
                         ids=["standard", "conversational", "pad_is_eos"])
def test_scores_equal_trls_reward_model(tmp_path, data, pad_is_eos):
    path = save_reward_model(tmp_path / "my-rm", pad_is_eos=pad_is_eos)
    prompts, completions = data
    name, want = trl_rewards(path, prompts, completions)
    rf = load_reward_func("my-rm", tmp_path)        # relative to the config's folder
    got = np.asarray(rf.fn(prompts=prompts, completions=completions, completion_ids=[[0]] * len(prompts),
                           trainer_state=None))
    assert rf.name == name == "my-rm"
    assert np.ptp(want) > 1e-3                           # distinct scores: a row mix-up would show
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if pad_is_eos:   # the trailing EOS is the pad id: pooled at the token before it, as transformers does
        rf_std = load_reward_func(str(save_reward_model(tmp_path / "std-pad")), tmp_path)
        assert rf_std.fn(prompts=prompts[-1:], completions=completions[-1:])[0] != pytest.approx(got[-1], abs=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "gemma2", "qwen3_moe"])
def test_other_bodies_score_as_trl(tmp_path, kind):
    """Checkpoints whose body is not under `model.` (GPT-2's `transformer.`, GPT-NeoX's `gpt_neox.`)."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPTNeoXConfig, GPTNeoXForSequenceClassification

    path = tmp_path / kind
    tok = make_tokenizer(path)
    common = dict(vocab_size=len(tok.get_vocab()), num_labels=1, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common))
    elif kind == "gemma2":   # embedding scale, attention and final soft-caps, sliding window
        model = transformers.Gemma2ForSequenceClassification(transformers.Gemma2Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=4, attn_logit_softcapping=5.0, **common))
    elif kind == "qwen3_moe":   # routed experts in the body
        model = transformers.Qwen3MoeForSequenceClassification(transformers.Qwen3MoeConfig(
            hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common))
    else:
        model = GPTNeoXForSequenceClassification(GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                               num_attention_heads=4, **common))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    _, want = trl_rewards(path, *STANDARD)
    rf = load_reward_func(kind, tmp_path)
    got = rf.fn(prompts=STANDARD[0], completions=STANDARD[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    if kind == "gpt2":   # learned positions: a longer text is refused in one line (transformers fails)
        from jaxpref.training.reward_model import RewardModelError

        with pytest.raises(RewardModelError, match="of 129 tokens is longer than its 128 positions"):
            rf.fn(prompts=["yes " * 129], completions=[""])


def test_more_rows_than_one_batch_keep_their_order(tmp_path, monkeypatch):
    from jaxpref.training import reward_model

    monkeypatch.setattr(reward_model, "BATCH_ROWS", 3)
    path = save_reward_model(tmp_path / "rm")
    prompts, completions = STANDARD[0] * 2, STANDARD[1][::-1] * 2    # 8 rows: batches of 3, 3, 2 (padded)
    _, want = trl_rewards(path, prompts, completions)
    got = load_reward_func(str(path), tmp_path).fn(prompts=prompts, completions=completions)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory, tiny_llama):
    import shutil

    d = tmp_path_factory.mktemp("rm_grpo")
    shutil.copytree(tiny_llama, d / "model")
    save_reward_model(d / "judge")
    save_reward_model(d / "two-labels", num_labels=2)
    (d / "rewards.py").write_text("def length(completions, **kw):\n    return [len(c.split()) for c in completions]\n")
    rows = [{"prompt": p} for p in ("what is one and one ?", "is the sun hot ?", "what is two and two ?",
                                     "is the sky blue ?")]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def grpo_config(d: Path, funcs: list, weights=None) -> Path:
    pt = {"method": "grpo", "reward_funcs": funcs, "reward_weights": weights, "num_generations": 4,
          "max_completion_length": 8, "beta": 0.0}
    return write_config(d / "grpo.yaml", d / "model", d / "prompts.jsonl", post_training=pt,
                        training={"max_steps": 1, "per_device_train_batch_size": 8, "logging_steps": 1,
                                  "seed": 0, "max_prompt_length": 32})


@pytest.mark.slow
def test_grpo_with_a_reward_model_and_a_function_logs_trls_names(tmp_path, grpo_setup, capsys):
    d = grpo_setup
    cfg = grpo_config(d, ["judge", "rewards.py:length"], [2.0, 0.5])
    _, metrics, samples = train_ok(cfg, tmp_path / "out", capsys)
    m = metrics[0]
    name, want = trl_rewards(d / "judge", [s["prompt"] for s in samples], [s["completion"] for s in samples])
    assert name == "judge"
    got = np.array([s["rewards"]["judge"] for s in samples])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    length = np.array([s["rewards"]["length"] for s in samples])
    total = 2.0 * want + 0.5 * length
    np.testing.assert_allclose([s["reward"] for s in samples], total, rtol=1e-5, atol=1e-5)
    assert m["rewards/judge/mean"] == pytest.approx(want.mean(), abs=1e-5)
    assert m["rewards/length/mean"] == pytest.approx(length.mean(), rel=1e-6)
    assert m["reward"] == pytest.approx(total.mean(), abs=1e-5)
    assert {"rewards/judge/std", "rewards/length/std"} <= set(m)


@pytest.mark.parametrize("entry, needles", [
    ("model", ["reward model `model`", "not a sequence-classification checkpoint", "LlamaForCausalLM"]),
    ("two-labels", ["reward model `two-labels`", "num_labels 2"]),
    ("rewards.py", ["reward_funcs[0]", "no reward model folder rewards.py"]),
])
def test_folders_that_are_not_reward_models_are_one_line_errors(tmp_path, grpo_setup, capsys, entry, needles):
    cfg = grpo_config(grpo_setup, [entry])
    train_refused(cfg, tmp_path / "out", capsys, needles)


def test_a_folder_without_a_score_head_is_refused(tmp_path, tiny_llama):
    import shutil

    from jaxpref.errors import ConfigError

    shutil.copytree(tiny_llama, tmp_path / "bare")
    hf = json.loads((tmp_path / "bare" / "config.json").read_text())
    hf.pop("architectures")
    (tmp_path / "bare" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="no `score.weight`"):
        load_reward_func("bare", tmp_path)


@pytest.mark.slow
def test_rows_split_over_two_devices_give_the_same_scores(tmp_path):
    """Two virtual CPU devices (a subprocess): the rows of a batch split over them, the weights
    replicated; 9 rows in batches of 4 (the last padded)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    path = save_reward_model(tmp_path / "rm")
    prompts, completions = (STANDARD[0] * 3)[:9], (STANDARD[1][::-1] * 3)[:9]
    _, want = trl_rewards(path, prompts, completions)
    code = ("import json, sys, jax\nfrom pathlib import Path\nfrom jaxpref.training import reward_model\n"
            "reward_model.BATCH_ROWS = 2\nfrom jaxpref.data.rewards import load_reward_func\n"
            "p, c = json.loads(sys.argv[2])\nrf = load_reward_func(sys.argv[1], Path('.'))\n"
            "print(json.dumps([jax.device_count(), rf.fn.mesh.size, rf.fn(prompts=p, completions=c)]))\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code, str(path), json.dumps([prompts, completions])], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    devices, mesh, got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert devices == mesh == 2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_conversational_prompts_need_the_reward_models_chat_template(tmp_path):
    from jaxpref.training.reward_model import RewardModelError

    path = save_reward_model(tmp_path / "rm")
    for f in path.glob("chat_template.*"):
        f.unlink()
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    rf = load_reward_func(str(path), tmp_path)
    assert rf.fn(prompts=STANDARD[0][:1], completions=STANDARD[1][:1])    # plain text still scores
    with pytest.raises(RewardModelError, match="reward model .* conversational prompts need a chat template"):
        rf.fn(prompts=CHAT[0], completions=CHAT[1])
