"""DPO against TRL's DPOTrainer where a sequence has no prompt left: an empty prompt, or
`truncation_mode: keep_end` cutting the whole prompt and the completion's start. Its first
completion token then sits at position 0, where nothing predicts it: TRL does not score it (nor
count it in the SFT and WPO token means or LD-DPO's shared length) but counts it in the completion
lengths that `ipo` and `sigmoid_norm` divide by. First logged step, tiny Llama, random LoRA, full
batch; jaxpref's default layout (shared prompt, padding-free), padded rows and packed rows."""
from __future__ import annotations

import json

import pytest

from conftest import PAIRS
from test_trl_trainers import assert_close, base_model, first_log, fresh_peft, ours, setup, trl_common  # noqa: F401

B = 4
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "num_tokens", "entropy",
        "mean_token_accuracy")
# keep_end at 6 tokens: "yes , it is hot . </s>" loses its whole prompt and its first word, "no . </s>"
# keeps part of its prompt (LD-DPO's tail is then 3 tokens of the chosen sequence).
KEEP_END = {"max_length": 6, "truncation_mode": "keep_end"}
CASES = {
    "ld_alpha-keep_end": ("pairs", KEEP_END, {"ld_alpha": 0.3}),
    "ipo-keep_end": ("pairs", KEEP_END, {"loss_type": "ipo"}),
    "ipo-empty_prompt": ("empty", {}, {"loss_type": "ipo"}),
    "sigmoid_norm-empty_prompt-sft": ("empty", {}, {"loss_type": ["sigmoid_norm", "sft"], "loss_weights": [1.0, 0.5]}),
    "ld_alpha-wpo-empty_prompt": ("empty", {}, {"ld_alpha": 0.5, "use_weighting": True}),
    "ipo-empty_prompt-padded": ("empty", {"pair_layout": "concatenated", "padding_free": False}, {"loss_type": "ipo"}),
    "ipo-keep_end-packed": ("pairs", {**KEEP_END, "pair_layout": "packed"}, {"loss_type": "ipo"}),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_sequences_without_prompt_score_as_trl(setup, tiny_llama, case):
    from trl import DPOConfig, DPOTrainer

    tmp, tok, adapter, _, _ = setup
    data, training, pt = CASES[case]
    pairs = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[4:4 + B]]
    rows = pairs if data == "pairs" else [dict(p, prompt="") for p in pairs[:2]] + pairs[2:]
    path = tmp / f"edge_{data}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    layout = ("pair_layout", "padding_free")
    args = {**trl_common(tmp), **{k: v for k, v in training.items() if k not in layout}, **pt}
    theirs = first_log(DPOTrainer, DPOConfig(**args), rows, tok, fresh_peft(tiny_llama, adapter),
                       ref_model=base_model(tiny_llama))
    mine = ours(tmp, tiny_llama, path, adapter, "dpo", tag=f"_edge_{case}", training=training,
                use_ref_model=True, **pt)
    assert_close(mine, theirs, KEYS)
