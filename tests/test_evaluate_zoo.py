"""`jaxpref.evaluate` on the model zoo: each pair's summed completion log-probs equal
transformers' (and, with a PEFT adapter, PEFT's) over the token ids that TRL's DPOTrainer makes
from the same rows, in standard and conversational data.

Gemma 2 brings the soft-caps (the final one inside the log-probs), pre/post norms, a window of 3
positions (shorter than every row) and (1 + weight) norms; Qwen3 its q/k norms and a window on its
first layer only; OLMo 2 its post-norms and full-width q/k norms; Phi-3 its fused qkv_proj (the
adapter on it) with half of each head rotated and a window; Qwen3-MoE and Mixtral their top-2-of-4
routing (Mixtral with a window). Gemma 2 and one Qwen3-MoE case run by default, the rest in the
slow group (tests/conftest.py).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
import yaml

from jaxpref import evaluate

USER = lambda s: {"role": "user", "content": s}
BOT = lambda s: [{"role": "assistant", "content": s}]
ROWS = {
    "standard": [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five, or maybe six."},
        {"prompt": "Name a colour: ", "chosen": "red", "rejected": "a number"},
    ],
    "conversational": [
        {"prompt": [USER("What colour is the sky?")], "chosen": BOT("Blue."), "rejected": BOT("Green.")},
        {"prompt": [{"role": "system", "content": "Be brief."}, USER("Two plus two?")],
         "chosen": BOT("Four."), "rejected": BOT("Five, or maybe six.")},
        {"prompt": [USER("Hi"), *BOT("Hello!"), USER("A colour?")], "chosen": BOT("Red."),
         "rejected": BOT("A number.")},
    ],
}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)
# name -> (config of vocabulary size v, the LoRA targets as PEFT names them).
QV = ["q_proj", "v_proj"]
ARCHS = {
    "gemma2": (lambda v: transformers.Gemma2Config(
        vocab_size=v, **SMALL, intermediate_size=128, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=3, attn_logit_softcapping=0.3, final_logit_softcapping=0.8,
        attn_implementation="eager"), QV),
    "qwen3_moe": (lambda v: transformers.Qwen3MoeConfig(
        vocab_size=v, **SMALL, intermediate_size=48, head_dim=32, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True), QV),
    "qwen3": (lambda v: transformers.Qwen3Config(
        vocab_size=v, **SMALL, intermediate_size=128, head_dim=32, use_sliding_window=True,
        sliding_window=3, max_window_layers=1), QV),
    "olmo2": (lambda v: transformers.Olmo2Config(vocab_size=v, **SMALL, intermediate_size=128), QV),
    "phi3": (lambda v: transformers.Phi3Config(
        vocab_size=v, **SMALL, intermediate_size=128, partial_rotary_factor=0.5, sliding_window=3,
        pad_token_id=0, eos_token_id=0), ["qkv_proj", "o_proj"]),
    "mixtral": (lambda v: transformers.MixtralConfig(
        vocab_size=v, **SMALL, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=3), QV),
}
BETA = 0.5


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for rows in ROWS.values() for r in rows] * 4
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def trl_ids(tmp_path_factory):
    """fmt -> TRL DPOTrainer's train_dataset rows (prompt_ids, chosen_ids, rejected_ids)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    tok = _tokenizer()
    torch.manual_seed(0)
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    out = {}
    for fmt, rows in ROWS.items():
        args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], max_length=None,
                         use_cpu=True, save_strategy="no", logging_strategy="no")
        trainer = DPOTrainer(model=tiny, ref_model=copy.deepcopy(tiny), args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
        out[fmt] = trainer.train_dataset.to_list()
    return tok, out


def _summed(model, prompt: list[int], completion: list[int]) -> float:
    seq = prompt + completion
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    return sum(float(logp[t - 1, seq[t]]) for t in range(len(prompt), len(seq)))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's own config on transformers 5
@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_evaluate_logps_match_transformers_and_peft(arch, fmt, trl_ids, tmp_path, monkeypatch, capsys):
    import peft

    tok, theirs = trl_ids
    torch.manual_seed(0)
    config, targets = ARCHS[arch]
    model = transformers.AutoModelForCausalLM.from_config(config(len(tok)), dtype=torch.float32).eval()
    with torch.no_grad():  # biases and norms away from their trivial init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "adapter")

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[fmt]))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"name": arch, "huggingface_id": str(tmp_path / "model")}],
        "dataset": {"name": str(data)}, "post_training": {"method": "dpo", "beta": BETA},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": targets},
        "training": {"per_device_eval_batch_size": 2, "max_length": 64}}))
    monkeypatch.chdir(tmp_path)  # the tokenized cache lands under ./checkpoints/.cache
    out = tmp_path / "out.jsonl"
    code = evaluate.main(["--config", str(cfg), "--output", str(out), "--split", "train",
                          "--adapter", str(tmp_path / "adapter")])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2]

    worst = 0.0
    for line in lines:
        t = theirs[fmt][line["index"]]
        for side in ("chosen", "rejected"):
            policy = _summed(pm, t["prompt_ids"], t[f"{side}_ids"])
            ref = _summed(model, t["prompt_ids"], t[f"{side}_ids"])
            worst = max(worst, abs(line[f"logps/{side}"] - policy), abs(line[f"ref_logps/{side}"] - ref))
            assert abs(line[f"rewards/{side}"] - BETA * (policy - ref)) <= 1e-4
    print(f"evaluate {arch} {fmt} vs transformers/PEFT: max|diff| = {worst:.1e}")
    assert worst <= 1e-4
    assert abs(lines[0]["logps/chosen"] - lines[0]["ref_logps/chosen"]) > 1e-3  # the adapter acts
