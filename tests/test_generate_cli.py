"""`python -m jaxpref.generate`: the completions transformers (and PEFT) decode greedily for the
same rendered prompts, one JSON line each, a readable preview, and bad input as one line."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_config
from jaxpref import generate
from jaxpref.generation import text
from test_generate import hf_greedy

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["the sky is", [{"role": "system", "content": "answer yes or no ."},
                          {"role": "user", "content": "is the sun hot ?"}]]


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXPREF_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "jaxpref.generate", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama, tiny_pairs):
    """(work dir, config, adapter dir, transformers model, PEFT model, tokenizer)."""
    import peft
    import torch
    import transformers

    root = tmp_path_factory.mktemp("generate_cli")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # sharper than the default init, so that completions vary
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(root / "model")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    tok.save_pretrained(root / "model")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    pm.save_pretrained(root / "adapter")
    cfg = write_config(root / "gen.yaml", root / "model", tiny_pairs)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                                                for i, p in enumerate(PROMPTS)))
    return root, cfg, root / "adapter", model, pm, tok


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _until_eos(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def test_cli_tuned_and_base_match_transformers(setup):
    root, cfg, adapter, model, pm, tok = setup
    out = root / "out.jsonl"
    p = _cli("--config", cfg, "--adapter", adapter, "--prompts", root / "prompts.jsonl", "--base-too",
             "--max-new-tokens", 24, "--output", out, cwd=root)
    assert p.returncode == 0, p.stderr
    rows = _lines(out)
    assert [(r["prompt"], r["model"]) for r in rows] == [(q, m) for q in PROMPTS for m in ("tuned", "base")]
    eos = text.eos_ids(root / "model", tok)
    ids = [text.prompt_ids(tok, q) for q in PROMPTS]
    for m, name in ((pm, "tuned"), (model, "base")):
        want = [_until_eos(x, eos) for x in hf_greedy(m, ids, 24, eos=list(eos))]
        assert [r["completion_ids"] for r in rows if r["model"] == name] == want
    for r in rows:
        assert r["completion"] == tok.decode(r["completion_ids"], skip_special_tokens=True)
        assert r["completion"].split()[0] in p.stdout   # the preview shows it
    assert "[tuned]" in p.stdout and "the sky is" in p.stdout and "is the sun hot ?" in p.stdout

    # An existing --output is never replaced without --overwrite: one line, exit 2.
    before = out.read_text()
    p = _cli("--config", cfg, "--prompt", "hello", "--output", out, cwd=root)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and out.read_text() == before


def test_cli_prompt_text_is_one_user_message(setup):
    root, cfg, _, model, _, tok = setup
    out = root / "one.jsonl"
    p = _cli("--config", cfg, "--prompt", "what is the colour of grass ?", "is it red ?",
             "--max-new-tokens", 12, "--output", out, cwd=root)
    assert p.returncode == 0, p.stderr
    rows = _lines(out)
    assert [r["prompt"] for r in rows] == ["what is the colour of grass ?", "is it red ?"]
    assert {r["model"] for r in rows} == {"base"}
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for m in msgs]
    eos = text.eos_ids(root / "model", tok)
    want = [_until_eos(x, eos) for x in hf_greedy(model, ids, 12, eos=list(eos))]
    assert [r["completion_ids"] for r in rows] == want


def test_flash_attention_in_the_config_needs_no_kernel_to_decode(setup, tmp_path, capsys, monkeypatch):
    """Decoding attends through its KV cache, never `training.attention`'s kernel: a run's config
    that names flash decodes where tokamax is missing (it was refused), to the same tokens."""
    from jaxpref.models import attention, flash

    root, cfg, *_ = setup
    outs = []
    for name, sets in (("plain", []), ("flash", ["--set", "training.attention=flash"])):
        if name == "flash":
            monkeypatch.setattr(flash, "tokamax", lambda: None)
            monkeypatch.setattr(attention, "tokamax", lambda: None)
        out = tmp_path / f"{name}.jsonl"
        code = generate.main(["--config", str(cfg), "--prompt", "the sky is", "--max-new-tokens", "6",
                              "--output", str(out), *sets])
        assert code == 0, capsys.readouterr().err
        outs.append([r["completion_ids"] for r in _lines(out)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("row,flags,needle", [
    ("{not json", [], "line 2 is not JSON"),
    ('{"text": "hi"}', [], "line 2 has no `prompt`"),
    ('{"prompt": 3}', [], "line 2: `prompt` must be a string or a list of messages"),
    ('[{"prompt": "hi"}]', [], "line 2 is an array, not an object with a `prompt`"),   # "has no `prompt`" before
    ('{"prompt": "ok"}', ["--temperature", "1", "--seed", "-1"], "--seed must be in [0, 2**32 - 1]"),   # ran before
    ('{"prompt": [{"content": "hi"}]}', [], "line 2: message 0 must be an object with `role`"),
    ('{"prompt": ""}', [], "line 2 is an empty string"),
    ('{"prompt": "ok"}', ["--temperature", "-1"], "--temperature must be >= 0"),
    ('{"prompt": "ok"}', ["--top-p", "0"], "--top-p must be in (0, 1]"),
    ('{"prompt": "ok"}', ["--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    # parsed and ignored before: greedy decoding draws nothing (transformers only warns)
    ('{"prompt": "ok"}', ["--top-p", "0.5", "--min-p", "0.1"],
     "--top-p 0.5, --min-p 0.1: sampling options, but --temperature 0 decodes greedily"),
    ('{"prompt": "ok"}', ["--temperature", "0", "--top-k", "5"], "--top-k 5: sampling options"),
    ('{"prompt": "ok"}', ["--base-too"], "--base-too compares against an adapter"),
    ('{"prompt": "ok"}', ["--stop", "</s>", "--stop", ""], "--stop is an empty string"),
    ('{"prompt": "ok"}', ["--run", "nowhere"], "--run nowhere: no adapter/adapter_config.json"),
    ('{"prompt": "\udcff"}', [], "line 2 is not UTF-8 text (byte 0xff); save the --prompts file as UTF-8"),
    ('{"prompt": "ok"}', ["--prompts", "."], "--prompts .: is a directory"),
    # a folder: not "pass --overwrite", which would not help
    ('{"prompt": "ok"}', ["--output", "."], "--output .: is a directory, expected a file"),
    ('{"prompt": "ok"}', ["--adapter", "README.md"], "--adapter README.md: is a file, expected an adapter folder"),
    # An OverflowError and an XLA out-of-memory traceback before.
    ('{"prompt": "ok"}', ["--max-new-tokens", "3000000000"], "must stay below 2**31 tokens"),
    ('{"prompt": "ok"}', ["--max-new-tokens", "1000000000"], "out of memory decoding prompts of up to"),
])
def test_bad_input_is_one_line(setup, tmp_path, capsys, row, flags, needle):
    root, cfg, *_ = setup
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(('{"prompt": "fine"}\n' + row + "\n").encode("utf-8", "surrogateescape"))
    code = generate.main(["--config", str(cfg), "--prompts", str(prompts), "--output",
                          str(tmp_path / "o.jsonl"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o.jsonl").exists()


def test_output_over_the_prompts_file_is_refused_even_with_overwrite(setup, tmp_path, capsys):
    """--output naming the --prompts file, with --overwrite, replaced the user's prompts."""
    root, cfg, *_ = setup
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the sky is"}\n')
    for out, what in ((prompts, "the --prompts file"), (cfg, "the config file")):
        code = generate.main(["--config", str(cfg), "--prompts", str(prompts), "--output", str(out), "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"that is {what}" in err[0], err
    assert prompts.read_text() == '{"prompt": "the sky is"}\n'


def test_run_of_a_full_finetune_names_its_model(setup, tmp_path, capsys):
    """--run of a full fine-tune (model/, no adapter/) said a finished run has an adapter."""
    root, cfg, *_ = setup
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    code = generate.main(["--config", str(cfg), "--run", str(tmp_path / "run"), "--prompt", "hi",
                          "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a full fine-tune" in err[0], err
    assert f"--set models.0.huggingface_id={tmp_path / 'run' / 'model'}" in err[0]


def test_prompt_past_a_learned_position_table_is_refused(tmp_path):
    """GPT-2's position table has n_positions rows: prompt + new tokens must fit in it."""
    import torch
    import transformers

    from jaxpref.errors import ConfigError
    from jaxpref.models.source import resolve
    from jaxpref.models.weights import build
    from test_model_parity import CONFIGS

    transformers.AutoModelForCausalLM.from_config(CONFIGS["gpt2"](), dtype=torch.float32).save_pretrained(tmp_path)
    bundle = build(resolve(str(tmp_path)))
    generate.check_lengths(bundle, [[5] * 40], 24)   # 64 positions: fits
    with pytest.raises(ConfigError, match=r"40 tokens \+ --max-new-tokens 25 exceeds the model's 64 positions"):
        generate.check_lengths(bundle, [[5] * 40], 25)


def test_cli_stop_string_ends_the_completion_at_its_token(setup, tmp_path):
    """`--stop WORD`: each completion is transformers' greedy one up to its first token whose text
    holds the word (transformers' `StopStringCriteria` cannot read this word-level vocabulary:
    its byte-level BPE counterpart is `test_stop_strings_cut_where_transformers_stops`)."""
    root, cfg, _, model, _, tok = setup
    ids = [text.prompt_ids(tok, q) for q in PROMPTS]
    eos = text.eos_ids(root / "model", tok)
    free = [_until_eos(x, eos) for x in hf_greedy(model, ids, 16, eos=list(eos))]
    word = tok.decode([free[0][3]])   # a word the first completion reaches after a few tokens
    out = tmp_path / "stop.jsonl"
    p = _cli("--config", cfg, "--prompts", root / "prompts.jsonl", "--stop", word, "--max-new-tokens", 16,
             "--output", out, cwd=root)
    assert p.returncode == 0, p.stderr
    ends = [next((i + 1 for i, t in enumerate(x) if word in tok.decode([t])), len(x)) for x in free]
    got = [r["completion_ids"] for r in _lines(out)]
    assert got == [x[:n] for x, n in zip(free, ends)] and len(got[0]) <= 4
