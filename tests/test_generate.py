"""KV-cached generation (`jaxpref.generation`) gives the tokens transformers' `generate` gives.

The oracle is transformers itself: tiny random models of every architecture (the configs of
`test_model_parity.py`), each prompt decoded greedily by `model.generate(do_sample=False)` one
at a time (no padding), and by jaxpref in one left-padded batch of different lengths, with the
base model and with a PEFT adapter (random B) loaded in transformers and in jaxpref.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from jaxpref.generation import text
from jaxpref.generation.engine import DecodeOptions, Generator
from jaxpref.generation.sampling import Sampling, warp
from jaxpref.lora.peft import load_adapter
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from test_model_parity import CONFIGS

REPO = Path(__file__).resolve().parents[1]
# Three prompts in two length buckets (16 and 32): the batch pads the short ones further than
# decoding them alone does.
PROMPTS = [[5, 17, 33], [71, 12, 3, 64, 9, 8, 99, 42, 7], [int(x) for x in np.arange(20) * 6 % 120 + 3]]
NEW = 40
ARCHS = ["llama", "llama3_rope", "mistral_window", "qwen2", "qwen2_window", "qwen2_window_some_layers",
         "qwen3", "qwen3_window_some_layers", "olmo2", "phi3", "phi3_longrope_short", "phi3_longrope_long",
         "gpt_neox_parallel", "gpt_neox_sequential", "gpt2", "gpt2_inverse_layer_scale",
         "gemma", "gemma2", "gemma3", "gemma3_softcap", "mixtral", "mixtral_window_tied", "qwen3_moe"]
LORA_TARGETS = {"gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt2": ["c_attn", "c_fc"],
                "phi3": ["qkv_proj", "gate_up_proj"], "mixtral": ["q_proj", "v_proj"], "qwen3_moe": ["q_proj", "v_proj"]}


def _hf_model(name: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases and sets norms to 1: perturb all (at 0.05, as the
        for p in model.parameters():  # parity tests do, greedy decoding mostly repeats one token)
            p.add_(0.2 * torch.randn_like(p))
    return model


def hf_greedy(model, prompts, new: int, eos=None, batched: bool = False) -> list[list[int]]:
    """transformers' greedy completions, one prompt at a time (or `batched`: left-padded with an
    attention mask); `eos` None: never stop early."""
    model.generation_config.eos_token_id = eos
    groups = [prompts] if batched else [[p] for p in prompts]
    out = []
    for group in groups:
        width = max(map(len, group))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.no_grad():
            res = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        out += res[:, width:].tolist()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (transformers model, PEFT model on a copy, our Generator, our LoRA tree)."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = _hf_model(name)
            model.save_pretrained(root / "base")
            family = next((f for f in LORA_TARGETS if name.startswith(f)), None)
            targets = LORA_TARGETS.get(family, ["q_proj", "v_proj", "down_proj"])
            fan = name.startswith("gpt2")
            pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fan)).eval()
            pm.save_pretrained(root / "adapter")
            bundle = build(resolve(str(root / "base")))
            lora, spec = load_adapter(root / "adapter", bundle, bundle.abstract_params())
            bundle = bundle.with_args(lora_scale=spec.scale)
            gen = Generator(bundle, bundle.runtime_params(load_params(bundle)), batch_size=4)
            cache[name] = (model, pm, gen, lora)
        return cache[name]
    return get


def _ids(completions) -> list[list[int]]:
    return [c.ids for c in completions]


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_batch_matches_transformers_generate(name, tiny):
    model, pm, gen, lora = tiny(name)
    ours = _ids(gen.generate(PROMPTS, DecodeOptions(NEW)))
    # LongRoPE switches to its long factors once a call's largest position, over the whole
    # batch, passes the original context (16 here, during the decoding): in a batch the short
    # rows switch with the longest, so the oracle is transformers' own left-padded batch.
    assert ours == hf_greedy(model, PROMPTS, NEW, batched=name == "phi3_longrope_short")
    assert len(set(map(tuple, ours))) > 1   # the prompts matter


@pytest.mark.parametrize("name", ["llama", "mistral_window", "qwen2", "qwen3", "olmo2", "phi3",
                                  "gpt_neox_parallel", "gpt2", "gemma", "gemma2", "mixtral", "qwen3_moe"])
def test_greedy_with_peft_adapter_matches_transformers(name, tiny):
    model, pm, gen, lora = tiny(name)
    tuned = _ids(gen.generate(PROMPTS, DecodeOptions(NEW), lora=lora))
    assert tuned == hf_greedy(pm, PROMPTS, NEW)
    # The same weights with the adapter left out are the base model again.
    assert _ids(gen.generate(PROMPTS, DecodeOptions(NEW))) == hf_greedy(model, PROMPTS, NEW)
    assert tuned != _ids(gen.generate(PROMPTS, DecodeOptions(NEW)))
    assert gen.compiles == 2   # one program with the adapter, one without


@pytest.mark.parametrize("name", ["llama", "mistral_window", "gpt2"])
def test_batched_prompts_give_the_tokens_of_one_at_a_time(name, tiny):
    _, _, gen, lora = tiny(name)
    for lo in (None, lora):
        batched = _ids(gen.generate(PROMPTS, DecodeOptions(NEW), lora=lo))
        alone = [gen.generate([p], DecodeOptions(NEW), lora=lo)[0].ids for p in PROMPTS]
        assert batched == alone


def test_layer_loop_decodes_the_same(tiny, tmp_path):
    """`training.scan_layers: false` (a loop over per-layer weights) takes the same cache path."""
    model, _, gen, _ = tiny("llama")
    model.save_pretrained(tmp_path)
    bundle = build(resolve(str(tmp_path)), scan_layers=False)
    loop = Generator(bundle, bundle.runtime_params(load_params(bundle)), batch_size=4)
    assert _ids(loop.generate(PROMPTS, DecodeOptions(NEW))) == _ids(gen.generate(PROMPTS, DecodeOptions(NEW)))


def test_eos_ends_each_row_as_transformers_does(tiny):
    """An eos id ends its row (kept as the last token, padding after it) and not the others."""
    model, _, gen, _ = tiny("qwen2")
    free = _ids(gen.generate(PROMPTS, DecodeOptions(NEW)))
    eos = free[1][6]
    stopped = gen.generate(PROMPTS, DecodeOptions(NEW, eos_ids=(eos, 127)))
    theirs = hf_greedy(model, PROMPTS, NEW, eos=[eos, 127])
    for ours, hf, full in zip(stopped, theirs, free):
        if eos in full:
            assert ours.ids == full[:full.index(eos) + 1] and ours.ids[-1] == eos
        assert hf[:len(ours.ids)] == ours.ids and set(hf[len(ours.ids):]) <= {0}
        assert len(ours.logprobs) == len(ours.ids)
    assert len(stopped[1].ids) == 7


@pytest.mark.parametrize("name", ["llama", "gemma2"])   # gemma2: the final-logit soft-cap applies
def test_logprobs_are_the_models_log_softmax(tiny, name):
    model, _, gen, _ = tiny(name)
    (out,) = gen.generate([PROMPTS[1]], DecodeOptions(8))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1] + out.ids])).logits[0, len(PROMPTS[1]) - 1:-1]
    want = torch.log_softmax(logits, -1)[torch.arange(8), torch.tensor(out.ids)].numpy()
    np.testing.assert_allclose(out.logprobs, want, atol=1e-4)


def test_sampling_is_reproducible_with_a_seed(tiny):
    _, _, gen, _ = tiny("llama")
    opts = DecodeOptions(NEW, Sampling(temperature=1.0, top_p=0.95, top_k=50, min_p=0.01))
    a, b = (_ids(gen.generate(PROMPTS, opts, seed=3)) for _ in range(2))
    assert a == b
    assert _ids(gen.generate(PROMPTS, opts, seed=4)) != a
    # top-k 1 leaves one token to draw: greedy.
    one = DecodeOptions(NEW, Sampling(temperature=0.7, top_k=1))
    assert _ids(gen.generate(PROMPTS, one, seed=5)) == _ids(gen.generate(PROMPTS, DecodeOptions(NEW)))


@pytest.mark.parametrize("s", [Sampling(0.7), Sampling(1.3, top_k=5), Sampling(1.0, top_p=0.8),
                               Sampling(0.9, min_p=0.1), Sampling(0.8, top_k=20, top_p=0.9, min_p=0.05)])
def test_warpers_keep_the_tokens_transformers_keeps(s):
    from transformers.generation import logits_process as lp

    logits = np.random.default_rng(0).normal(0, 3, size=(4, 300)).astype(np.float32)
    x = torch.tensor(logits)
    for on, w in ((s.temperature != 1.0, lambda: lp.TemperatureLogitsWarper(s.temperature)),
                  (s.top_k > 0, lambda: lp.TopKLogitsWarper(s.top_k)),
                  (s.top_p < 1.0, lambda: lp.TopPLogitsWarper(s.top_p)),
                  (s.min_p > 0.0, lambda: lp.MinPLogitsWarper(s.min_p))):
        if on:
            x = w()(None, x)
    ours = np.asarray(warp(jax.numpy.asarray(logits), s))
    theirs = x.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_eos_ids_stop_strings_and_prompt_rendering(tmp_path):
    from conftest import make_tokenizer

    tok = make_tokenizer(tmp_path)
    assert text.eos_ids(tmp_path, tok) == (tok.eos_token_id,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 7]}))
    assert text.eos_ids(tmp_path, tok) == (7, 2)
    msgs = [{"role": "user", "content": "what is the sky ?"}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.prompt_ids(tok, msgs) == tok(rendered, add_special_tokens=False)["input_ids"]
    assert text.prompt_ids(tok, "the sky is") == tok("the sky is")["input_ids"]
    assert text.user_prompt(tok, "hi") == [{"role": "user", "content": "hi"}]
    ids = tok("yes it is blue . no it is red .", add_special_tokens=False)["input_ids"]
    assert tok.decode(text.cut_at_stop(tok, ids, ["blue", "red"])).endswith("blue")
    assert text.cut_at_stop(tok, ids, ["green"]) == ids


MESH_SCRIPT = """
import json, sys
import jax
from jax.sharding import Mesh
import numpy as np
from jaxpref.generation.engine import DecodeOptions, Generator
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
prompts = json.loads(sys.argv[2])
bundle = build(resolve(sys.argv[1]))
params = load_params(bundle)
one = Generator(bundle, params, batch_size=8).generate(prompts, DecodeOptions(24))
mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
gen = Generator(bundle, params, mesh=mesh, batch_size=8)
many = gen.generate(prompts, DecodeOptions(24))
print(json.dumps({"devices": jax.device_count(), "same": [a.ids == b.ids for a, b in zip(one, many)],
                  "sharded": str(gen._rows.spec)}))
"""


def test_data_parallel_mesh_gives_single_device_tokens(tiny, tmp_path):
    """8 virtual CPU devices, rows split over data x fsdp = 4 x 2: the single-device tokens."""
    model, _, _, _ = tiny("llama")
    model.save_pretrained(tmp_path)
    prompts = [PROMPTS[i % 3][: 3 + i] for i in range(8)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path), json.dumps(prompts)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["devices"] == 8 and all(got["same"]) and len(got["same"]) == 8


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_transformers(penalty):
    """Fixed logits and rows of earlier tokens (repeats included): the penalised logits, and the
    warped ones after it, are transformers' RepetitionPenaltyLogitsProcessor's (then its warpers)."""
    from transformers.generation import logits_process as lp

    from jaxpref.generation.sampling import penalize, seen_tokens

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(3, 50)).astype(np.float32)
    ids = rng.integers(0, 50, size=(3, 7))
    ids[0, 3] = ids[0, 1]
    theirs = lp.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits)).numpy()
    seen = seen_tokens(jax.numpy.asarray(ids), jax.numpy.ones(ids.shape, bool), 50)
    ours = np.asarray(penalize(jax.numpy.asarray(logits), seen, penalty))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert (ours != logits).sum() == len({(r, t) for r in range(3) for t in ids[r]})
    s = Sampling(0.8, top_k=20, min_p=0.05, repetition_penalty=penalty)
    warped = lp.MinPLogitsWarper(0.05)(None, lp.TopKLogitsWarper(20)(None, lp.TemperatureLogitsWarper(0.8)(
        None, torch.tensor(theirs)))).numpy()
    mine = np.asarray(warp(jax.numpy.asarray(ours), s))
    np.testing.assert_array_equal(np.isinf(mine), np.isinf(warped))
    np.testing.assert_allclose(mine[~np.isinf(mine)], warped[~np.isinf(warped)], rtol=1e-6)


def test_greedy_with_repetition_penalty_matches_transformers_generate(tiny):
    """One unpadded prompt at a time (transformers would penalise a padded row's pad id too)."""
    model, tok, gen, _ = tiny("llama")
    opts = DecodeOptions(NEW, Sampling(repetition_penalty=1.5))
    outs = gen.generate(PROMPTS, opts)
    plain = gen.generate(PROMPTS, DecodeOptions(NEW))
    model.generation_config.eos_token_id = None
    for p, o in zip(PROMPTS, outs):
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, repetition_penalty=1.5,
                                  pad_token_id=0)[0, len(p):].tolist()
        assert o.ids == want
    assert [o.ids for o in outs] != [o.ids for o in plain]   # the penalty changed what was generated


@pytest.mark.parametrize("case", ["config_json_list", "config_json_one", "generation_config_list",
                                  "generation_config_without_eos"])
def test_eos_ids_are_the_ones_transformers_generate_stops_at(case, tmp_path):
    """A model folder without generation_config.json: transformers' `generate` stops at
    config.json's eos ids (`GenerationConfig.from_model_config`), not only at the tokenizer's."""
    from conftest import save_tiny_llama

    save_tiny_llama(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    gen_file = tmp_path / "generation_config.json"
    gen_file.unlink()
    if case == "config_json_list":
        cfg["eos_token_id"] = [5, tok.eos_token_id, 5]
    elif case == "config_json_one":
        cfg["eos_token_id"] = 7
    elif case == "generation_config_list":
        gen_file.write_text(json.dumps({"eos_token_id": [9, 8]}))
        cfg["eos_token_id"] = 7
    else:
        gen_file.write_text(json.dumps({"bos_token_id": 1}))
        cfg["eos_token_id"] = 7
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).generation_config.eos_token_id
    want = tok.eos_token_id if hf is None else hf   # none named: the tokenizer's
    want = list(dict.fromkeys(want if isinstance(want, list) else [want]))
    assert list(text.eos_ids(tmp_path, tok)) == want
    assert case == "generation_config_without_eos" or want != [tok.eos_token_id]


STOP_CASES = [  # (prompt, completion, stop strings): inside the completion, or begun in the prompt
    ("Question: what colour is the sky?\nAnswer:", " The sky is blue.\n\nQuestion: and the grass?\nAnswer: green.",
     [["\n\n"], ["blue"], [" blue."], ["ue.\n"], ["Answer:"], ["Question:", "grass"], ["nope"], ["e"]]),
    ("Answer: the sky", " is blue. It is", [[" sky is"], ["sky"], ["is"]]),
    ("Q: hi\n", "\nA: hello\n\nB", [["\n\n"], ["hi\n\nA"]]),
]


def test_stop_strings_cut_where_transformers_stops():
    """`--stop`: the completion ends with the token at which transformers' `StopStringCriteria`
    (run on prompt + completion, token by token) stops generating, a stop string begun in the
    prompt included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.generation.stopping_criteria import StopStringCriteria

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [p + c for p, c, _ in STOP_CASES] * 8
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    spanning = 0
    for prompt, completion, stop_lists in STOP_CASES:
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"]
        for stops in stop_lists:
            crit = StopStringCriteria(tok, stops)
            n = next((i for i in range(1, len(c) + 1) if crit(torch.tensor([p + c[:i]]), None)[0]), len(c))
            assert text.cut_at_stop(tok, c, stops, p) == c[:n], (prompt, stops)
            spanning += text.cut_at_stop(tok, c, stops) != c[:n]   # the completion's text alone
    assert spanning >= 3
