"""`lora.target_modules` left out, as the seed README's Quick Start leaves it (pythia, a GPT-NeoX):
the q/k/v/o_proj default where the model has those modules, PEFT's own default for the
architectures that name their attention otherwise (PEFT's `LoraConfig()` without targets)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml

from conftest import make_tokenizer, write_config
from jaxpref import train

ARCHS = {
    "gpt_neox": lambda v: transformers.GPTNeoXConfig(vocab_size=v, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4),
    "gpt2": lambda v: transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_seed_quickstart_lora_without_targets_takes_peft_default(arch, tmp_path, tiny_pairs, capsys):
    from peft import LoraConfig, get_peft_model

    model_dir = tmp_path / arch
    tok = make_tokenizer(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch](len(tok.get_vocab())))
    model.save_pretrained(model_dir)
    cfg_path = write_config(tmp_path / "c.yaml", model_dir, tiny_pairs, training={"max_steps": 1})
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["lora"] = {"r": 16, "lora_alpha": 32}   # the seed's Quick Start: no target_modules
    cfg_path.write_text(yaml.safe_dump(cfg))
    code = train.main(["--config", str(cfg_path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    ours = json.loads((tmp_path / "out" / "tiny" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32))
    theirs = peft_model.peft_config["default"].target_modules
    assert set(ours) == set(theirs)
    assert "PEFT's default" in err
