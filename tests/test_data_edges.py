"""Data edges against TRL 1.16's own preprocessing (DPOTrainer's train_dataset), with the
GPT-2-style tokenizer of tests/test_data_trl.py: assistant messages with extra keys, row counts."""
from __future__ import annotations

import copy

import pytest

from test_data_trl import _gpt2_style_tokenizer, _trl_tokenized, datasets_from

from jaxpref.config import DatasetConfig
from jaxpref.data import tokenize

USER = lambda s: {"role": "user", "content": s}
ASSISTANT = lambda s: {"role": "assistant", "content": s}

# Renders an assistant's `reasoning_content` and `tool_calls` (as Qwen3's and Llama 3's templates do).
TOOL_CALLS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}CALL {{ c['function']['name'] }}"
    "({{ c['function']['arguments'] }}){% endfor %}{% endif %}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def _call(name: str) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "arguments": '{"a": 1}'}}]


@pytest.fixture(scope="module")
def tool_tok():
    tok = _gpt2_style_tokenizer()
    tok.chat_template = TOOL_CALLS_TEMPLATE
    return tok


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_tool_call_completions_are_kept_and_tokenized_as_trl(tool_tok, tmp_path):
    """A completion that is a tool call (empty content, `tool_calls` set) or carries reasoning is
    trained on by TRL, so it is not an "empty" completion; the token ids are TRL's."""
    rows = [
        {"prompt": [USER("Think?")], "chosen": [{"role": "assistant", "content": "yes", "reasoning_content": "hmm"}],
         "rejected": [{"role": "assistant", "content": "no", "reasoning_content": None}]},
        {"prompt": [USER("Add")], "chosen": [{"role": "assistant", "content": "", "tool_calls": _call("add")}],
         "rejected": [ASSISTANT("I can't")]},
        {"prompt": [USER("Add"), {"role": "assistant", "content": None, "tool_calls": _call("add")},
                    {"role": "tool", "content": "2"}], "chosen": [ASSISTANT("It is 2")], "rejected": [ASSISTANT("3")]},
    ]
    theirs = _trl_tokenized(tool_tok, rows, tmp_path)
    ours = tokenize.prepare(datasets_from(rows), DatasetConfig(name="rows"), tool_tok, "dpo")
    assert ours.skipped == {} and len(ours) == len(theirs) == 3
    for i, t in enumerate(theirs):
        assert (ours.prompt[i], ours.chosen[i], ours.rejected[i]) == (t["prompt_ids"], t["chosen_ids"],
                                                                      t["rejected_ids"]), i
    assert "CALL add" in tool_tok.decode(ours.chosen[1])


def test_equal_completions_are_skipped_whatever_null_keys_arrow_adds(tool_tok):
    """Arrow gives every message of a column the keys of all its messages (null where absent), so
    chosen and rejected columns may differ by null keys: equal completions are still equal."""
    rows = [{"prompt": [USER("x")], "chosen": [ASSISTANT("same")], "rejected": [ASSISTANT("same")]},
            {"prompt": [USER("Add")], "chosen": [{"role": "assistant", "content": "", "tool_calls": _call("add")}],
             "rejected": [ASSISTANT("no")]}]
    ours = tokenize.prepare(datasets_from(rows), DatasetConfig(name="rows"), copy.deepcopy(tool_tok), "dpo")
    assert ours.skipped == {"chosen equals rejected": 1} and ours.source == [1]


@pytest.mark.parametrize("max_length", [None, 64])
def test_a_prompt_cut_by_max_prompt_length_is_a_truncated_row(max_length):
    """`rows truncated` (dry run, start line, summary.json) counts every row whose tokens the run
    cuts: by `max_prompt_length` (keeping the prompt's end) as well as by `max_length`."""
    from jaxpref.data.lengths import apply_lengths

    tok = _gpt2_style_tokenizer()
    rows = [{"prompt": "Answer in one word. The capital of France is ", "chosen": "Paris", "rejected": "Lyon"},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
    data = tokenize.prepare(datasets_from(rows), DatasetConfig(name="rows"), tok, "dpo")
    full = [list(p) for p in data.prompt]
    out, report = apply_lengths(data, max_length, 4, "keep_start")
    cut = [i for i, p in enumerate(full) if len(p) > 4]
    assert 0 < len(cut) < len(rows)
    assert [out.prompt[i] for i in cut] == [full[i][-4:] for i in cut]
    assert report.truncated == len(cut) and report.dropped == 0


def test_csv_text_columns_keep_the_file_text(tmp_path):
    """A CSV of numeric answers: the reader would infer numbers (every row skipped as "not a
    string", "007" read as 7); the text columns are the file's text, an empty cell a null."""
    from jaxpref.data import load

    f = tmp_path / "math.csv"
    f.write_text("prompt,chosen,rejected,label\n2+2=,4,5,True\n7*1=,007,1.50,False\n1+1=,,3,True\n")
    cfg = DatasetConfig(name=str(f))
    rows = load.load_rows(cfg)
    assert rows["chosen"] == ["4", "007", None] and rows["rejected"] == ["5", "1.50", "3"]
    assert rows["label"] == [True, False, True]   # other columns keep the reader's types
    data = tokenize.prepare(rows, cfg, _gpt2_style_tokenizer(), "dpo")
    assert len(data) == 2 and data.skipped == {"chosen is null": 1}


def test_arrow_files_and_folders_of_arrow_shards_load(tmp_path):
    """A `.arrow` file (as `datasets` writes its shards) and a folder of them are datasets too."""
    import shutil

    from jaxpref.data import load

    rows = [{"prompt": f"p{i} ", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(4)]
    datasets_from(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "shards").mkdir()
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "one.arrow")
    shutil.copy(tmp_path / "one.arrow", tmp_path / "shards" / "part-0.arrow")
    for name in (tmp_path / "one.arrow", tmp_path / "shards"):
        assert load.load_rows(DatasetConfig(name=str(name))).to_list() == rows, name


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kto_unpairs_in_trl_blocks_of_dataset_rows_when_rows_are_skipped(tmp_path):
    """TRL unpairs paired data for KTO in blocks of 1000 dataset rows (all chosen, then all
    rejected). A row skipped here (chosen equal to rejected) must not pull the next block's first
    row into this block: the examples come in TRL's order, less the skipped row's two."""
    import torch
    import transformers
    from trl import KTOConfig, KTOTrainer

    tok = _gpt2_style_tokenizer()
    rows = [{"prompt": f"Q{i}: ", "chosen": f"yes {i}", "rejected": f"no {i}", "id": i} for i in range(1003)]
    rows[3]["rejected"] = rows[3]["chosen"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    args = KTOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=None,
                     per_device_train_batch_size=2, save_strategy="no", logging_strategy="no")
    theirs = KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tok,
                        train_dataset=datasets_from(rows)).train_dataset.to_list()
    theirs = [t for t in theirs if t["id"] != 3]
    ours = tokenize.prepare(datasets_from(rows), DatasetConfig(name="rows"), tok, "kto")
    assert ours.skipped == {"chosen equals rejected": 1} and len(ours) == len(theirs) == 2004
    assert [rows[i]["id"] for i in ours.source] == [t["id"] for t in theirs]
    assert ours.label == [t["label"] for t in theirs]
    assert ours.completion == [t["completion_ids"] for t in theirs]


def test_online_prompts_keep_dataset_max_samples(tmp_path):
    """`dataset.max_samples` takes the first N rows for the online methods too (GRPO, RLOO, online
    DPO and PPO read their prompts through `prepare_prompts`; the key was read by the offline
    methods only)."""
    from jaxpref.data.prompts import prepare_prompts

    rows = [{"prompt": f"Q{i}: 2+{i}=", "answer": str(2 + i)} for i in range(5)]
    out = prepare_prompts(datasets_from(rows), DatasetConfig(name="rows", max_samples=3), _gpt2_style_tokenizer())
    assert len(out) == 3 and out.rows_in == 3 and out.columns["answer"] == ["2", "3", "4"]


def test_rows_in_with_an_eval_fraction_counts_the_split_rows(tmp_path):
    """With `dataset.eval_fraction`, the dry run's "N rows in" (and evaluate's `rows_in`) is the
    split's rows, beside its skipped rows: rows in = train + eval + skipped."""
    import json

    from jaxpref.config import config_from_dict
    from jaxpref.data import prepare

    rows = [{"prompt": f"Q{i} ", "chosen": f"a{i}", "rejected": f"b{i}" if i % 5 else f"a{i}"} for i in range(20)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict({"models": [{"name": "m", "huggingface_id": str(tmp_path / "model")}],
                            "dataset": {"name": str(f), "eval_fraction": 0.25}, "post_training": {"method": "dpo"}})
    p = prepare.data_for(cfg, _gpt2_style_tokenizer(), cache_root=tmp_path / "cache")
    assert p.train.skipped == {"chosen equals rejected": 4} and (len(p.train), len(p.eval)) == (12, 4)
    assert p.train.rows_in == p.eval.rows_in == 20


def test_half_a_surrogate_pair_is_named_by_line(tmp_path):
    """`\\ud800` alone is valid JSON to Python but no character: Arrow refuses the file saying "in
    row 0"; the error names the file and line."""
    from jaxpref.data import load
    from jaxpref.errors import DataError

    f = tmp_path / "rows.jsonl"
    f.write_text('{"prompt": "\\ud83d\\ude00 ok", "chosen": "a", "rejected": "b"}\n'
                 '{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: a string holds half a surrogate pair \(\\ud800\)"):
        load.load_rows(DatasetConfig(name=str(f)))


def test_a_folder_of_mixed_file_types_is_refused(tmp_path):
    """`datasets` reads a folder as its most common file type and leaves the other files out
    without a word (here a.jsonl's rows): the folder is refused, naming a file of each type."""
    import json

    from jaxpref.data import load
    from jaxpref.errors import DataError

    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    datasets_from(rows[2:]).to_parquet(str(tmp_path / "b.parquet"))
    datasets_from(rows[2:]).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "dataset_infos.json").write_text("{}")   # metadata `datasets` ignores: no file type of its own
    (tmp_path / "a.jsonl").rename(tmp_path / "a.txt")
    assert len(load.load_rows(DatasetConfig(name=str(tmp_path)))) == 4
    (tmp_path / "a.txt").rename(tmp_path / "a.jsonl")
    with pytest.raises(DataError, match=r"mixes data file types \(json: a.jsonl, parquet: b.parquet\)"):
        load.load_rows(DatasetConfig(name=str(tmp_path)))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_implicit_prompt_messages_compare_without_arrow_null_keys(tool_tok, tmp_path):
    """hh-rlhf-style message lists where only the chosen column has a tool call: Arrow gives every
    chosen message a null `tool_calls`, so TRL's dict comparison finds no common message and fails
    on the empty prompt. The prompt is the common messages, and the ids are those TRL gives for
    the same rows when both columns carry the key."""
    call = {"role": "assistant", "content": "", "tool_calls": _call("f")}
    rows = [{"chosen": [USER("q1"), ASSISTANT("yes")], "rejected": [USER("q1"), ASSISTANT("no")]},
            {"chosen": [USER("q2"), call], "rejected": [USER("q2"), ASSISTANT("no")]}]
    same_keys = [rows[0], {**rows[1], "rejected": [USER("q2"), {**call, "tool_calls": _call("g")}]}]
    theirs = _trl_tokenized(tool_tok, same_keys, tmp_path)
    ours = tokenize.prepare(datasets_from(rows), DatasetConfig(name="rows"), tool_tok, "dpo")
    assert ours.skipped == {} and len(ours) == 2
    assert (ours.prompt[0], ours.chosen[0], ours.rejected[0]) == (theirs[0]["prompt_ids"], theirs[0]["chosen_ids"],
                                                                  theirs[0]["rejected_ids"])
    assert (ours.prompt[1], ours.chosen[1]) == (theirs[1]["prompt_ids"], theirs[1]["chosen_ids"])
    assert tool_tok.decode(ours.prompt[1]) == "user: q2<|endoftext|>\nassistant:"


def test_one_file_takes_a_slice_of_its_train_split(tmp_path):
    """`dataset.split: train[:2]` / `eval_split: train[75%:]` (datasets' slice syntax, which a folder
    and data_files take) work for one file too; another split name is still refused."""
    import json

    from jaxpref.data import load
    from jaxpref.errors import DataError

    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}) + "\n" for i in range(4)))
    cfg = DatasetConfig(name=str(f), split="train[:2]", eval_split="train[75%:]")
    assert load.load_rows(cfg)["prompt"] == ["p0", "p1"]
    assert load.load_rows(cfg, cfg.eval_split)["prompt"] == ["p3"]
    with pytest.raises(DataError, match="only a `train` split; split `test` was asked"):
        load.load_rows(cfg, "test")
