"""`python -m jaxpref.evaluate` writes the log-probs that transformers (and PEFT, with an adapter)
compute on the same tokens, one line per pair, and reports bad input as one line with exit 2."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import perturbed_llama
from jaxpref import evaluate

ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five, or maybe six."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},  # skipped: chosen equals rejected
    {"prompt": "Name a colour: ", "chosen": "red", "rejected": "a number"},
    {"prompt": "Is water wet?", "chosen": " Yes.", "rejected": " No."},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Berlin."},
]
BETA = 0.25


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([json.dumps(r) for r in ROWS] * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config path, transformers model, PEFT model, adapter dir, tokenized pairs, work dir)."""
    import peft

    root = tmp_path_factory.mktemp("evaluate")
    tok = _tokenizer()
    model = perturbed_llama(len(tok))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    adapter = root / "adapter"
    pm.save_pretrained(adapter)

    data_file = root / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "tiny", "huggingface_id": str(model_dir)}],
        "dataset": {"name": str(data_file)},
        "post_training": {"method": "dpo", "beta": BETA},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"per_device_eval_batch_size": 2, "max_length": 64},
    }))
    return config, model, pm, adapter, tok, root


def _run(setup, monkeypatch, capsys, *extra) -> tuple[int, list[dict], str, str]:
    config, _, _, _, _, root = setup
    monkeypatch.chdir(root)  # the tokenized cache lands under ./checkpoints/.cache
    out = root / "out.jsonl"
    out.unlink(missing_ok=True)
    code = evaluate.main(["--config", str(config), "--output", str(out), *extra])
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return code, lines, captured.out, captured.err


def _torch_logps(model, tok, row) -> tuple[float, float]:
    """Summed completion log-probs of chosen and rejected, tokenized as TRL does (prompt alone and
    prompt+completion+eos, the completion starting where they diverge)."""
    out = []
    p = tok(row["prompt"])["input_ids"]
    for comp in (row["chosen"], row["rejected"]):
        ids = tok(row["prompt"] + comp + tok.eos_token)["input_ids"]
        n = next((i for i, (a, b) in enumerate(zip(p, ids)) if a != b), min(len(p), len(ids)))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(float(logp[t - 1, ids[t]]) for t in range(max(n, 1), len(ids))))
    return out[0], out[1]


def test_base_model_logps_match_transformers(setup, monkeypatch, capsys):
    _, model, _, _, tok, _ = setup
    code, lines, out, err = _run(setup, monkeypatch, capsys, "--split", "train")
    assert code == 0, err
    assert [x["index"] for x in lines] == [0, 1, 3, 4, 5]  # row 2 is skipped, indices are the file's
    worst = 0.0
    for line in lines:
        c, r = _torch_logps(model, tok, ROWS[line["index"]])
        worst = max(worst, abs(line["logps/chosen"] - c), abs(line["logps/rejected"] - r))
        # Without an adapter the policy is the reference.
        assert line["ref_logps/chosen"] == line["logps/chosen"]
        assert line["rewards/chosen"] == line["rewards/rejected"] == 0.0
    print(f"evaluate vs transformers: max|diff| = {worst:.1e}")
    assert worst <= 1e-4
    summary = json.loads(out)
    assert summary["examples"] == 5 and summary["split"] == "train"
    assert summary["skipped_rows"] == {"chosen equals rejected": 1}
    assert summary["rewards/accuracies"] == 0.0 and summary["ties"] == 5


def test_adapter_logps_match_peft(setup, monkeypatch, capsys):
    _, model, pm, adapter, tok, _ = setup
    code, lines, out, err = _run(setup, monkeypatch, capsys, "--adapter", str(adapter), "--split", "train")
    assert code == 0, err
    worst = 0.0
    for line in lines:
        row = ROWS[line["index"]]
        pc, pr = _torch_logps(pm, tok, row)
        rc, rr = _torch_logps(model, tok, row)
        worst = max(worst, abs(line["logps/chosen"] - pc), abs(line["logps/rejected"] - pr),
                    abs(line["ref_logps/chosen"] - rc), abs(line["ref_logps/rejected"] - rr))
        assert abs(line["rewards/chosen"] - BETA * (pc - rc)) <= 1e-4
        assert abs(line["rewards/rejected"] - BETA * (pr - rr)) <= 1e-4
    print(f"evaluate with adapter vs PEFT: max|diff| = {worst:.1e}")
    assert worst <= 1e-4
    assert abs(lines[0]["logps/chosen"] - lines[0]["ref_logps/chosen"]) > 1e-3  # the adapter acts
    summary = json.loads(out)
    rc = np.array([x["rewards/chosen"] for x in lines])
    rr = np.array([x["rewards/rejected"] for x in lines])
    # As TRL's evaluate(): each eval batch's mean (per_device_eval_batch_size 2: 2, 2, 1 pairs), then their mean.
    by_batch = lambda x: np.mean([np.mean(x[i:i + 2]) for i in range(0, len(x), 2)])
    assert summary["rewards/accuracies"] == pytest.approx(by_batch(rc > rr))
    assert summary["rewards/margins"] == pytest.approx(by_batch(rc - rr))


def test_max_examples_and_eval_fraction(setup, monkeypatch, capsys):
    code, lines, out, err = _run(setup, monkeypatch, capsys, "--split", "train", "--max-examples", "3")
    assert code == 0, err
    assert [x["index"] for x in lines] == [0, 1, 3]
    # With an eval fraction the default split is eval: rows that training never sees.
    code, lines, out, err = _run(setup, monkeypatch, capsys, "--set", "dataset.eval_fraction=0.4")
    assert code == 0, err
    assert json.loads(out)["split"] == "eval" and len(lines) == 2


@pytest.mark.parametrize("extra,message", [
    (["--split", "eval"], "no eval data"),
    (["--adapter", "/nonexistent/adapter"], "--adapter /nonexistent/adapter: no such directory"),
    (["--model-index", "3"], "--model-index 3 is out of range"),
    (["--output", "/"], "--output /: is a directory"),
])
def test_bad_input_is_one_line_and_exit_2(setup, monkeypatch, capsys, extra, message):
    code, lines, out, err = _run(setup, monkeypatch, capsys, *extra)
    assert code == 2 and not lines
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("jaxpref.evaluate: error:")


def test_run_folder_train_split_note_and_adapter_checks(setup, monkeypatch, capsys, tmp_path):
    """--run DIR reads its config.yaml and adapter/; evaluating the train split because the config
    has none is said; an adapter of another model is refused naming what it was made for, and one
    made for another name that fits is evaluated with a warning."""
    import json as _json
    import shutil

    import peft

    config, model, _, adapter, tok, root = setup
    code, by_flags, _, err = _run(setup, monkeypatch, capsys, "--adapter", str(adapter))
    assert code == 0 and "has no eval split" in err and "evaluating on the train split" in err, err
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    shutil.copytree(adapter, run / "adapter")
    out = tmp_path / "by_run.jsonl"
    assert evaluate.main(["--run", str(run), "--output", str(out)]) == 0
    assert [_json.loads(x) for x in out.read_text().splitlines()] == by_flags

    other = perturbed_llama(len(tok), hidden_size=32, intermediate_size=64)
    other.name_or_path = "someone/other-model"
    foreign = tmp_path / "foreign"
    peft.get_peft_model(other, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                        ).save_pretrained(foreign)
    capsys.readouterr()  # the runs above, peft's warnings
    code, lines, _, err = _run(setup, monkeypatch, capsys, "--adapter", str(foreign))
    assert code == 2 and not lines and len(err.strip().splitlines()) == 1, err
    assert "this model needs" in err and "made for someone/other-model" in err, err

    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    cfg = _json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(_json.dumps({**cfg, "base_model_name_or_path": "org/another"}))
    code, lines, _, err = _run(setup, monkeypatch, capsys, "--adapter", str(renamed))
    assert code == 0 and lines == by_flags and "was made for org/another" in err, err


def test_run_folder_of_a_full_finetune_evaluates_its_model(setup, monkeypatch, capsys, tmp_path):
    """--run of a full fine-tune (model/, no adapter/) evaluated the base model as the run's result
    (every reward 0); its model/ is the policy and the base the reference, as in its training. A
    run folder with neither is refused."""
    config, model, _, _, tok, root = setup
    run = tmp_path / "run"
    run.mkdir()
    data = yaml.safe_load(config.read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**data, "lora": {"enabled": False}}))
    out = tmp_path / "o.jsonl"
    assert evaluate.main(["--run", str(run), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no adapter/ nor model/" in err[0] and not out.exists(), err
    tuned = perturbed_llama(len(tok), seed=5)
    tuned.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    monkeypatch.chdir(root)
    assert evaluate.main(["--run", str(run), "--output", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    worst = 0.0
    for line in lines:
        pc, pr = _torch_logps(tuned, tok, ROWS[line["index"]])
        rc, rr = _torch_logps(model, tok, ROWS[line["index"]])
        worst = max(worst, abs(line["logps/chosen"] - pc), abs(line["logps/rejected"] - pr),
                    abs(line["ref_logps/chosen"] - rc), abs(line["ref_logps/rejected"] - rr))
        assert abs(line["rewards/chosen"] - BETA * (pc - rc)) <= 1e-4
    assert worst <= 1e-4 and abs(lines[0]["rewards/chosen"]) > 1e-3


def test_existing_output_is_refused_unless_overwrite(setup, monkeypatch, capsys):
    """An existing --output file is the user's: refused in one line (naming --overwrite) and left
    as it was; --overwrite replaces it."""
    config, _, _, _, _, root = setup
    monkeypatch.chdir(root)
    out = root / "mine.jsonl"
    out.write_text("my notes\n")
    assert evaluate.main(["--config", str(config), "--output", str(out), "--max-examples", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err and "exists" in err, err
    assert out.read_text() == "my notes\n"
    assert evaluate.main(["--config", str(config), "--output", str(out), "--max-examples", "2",
                          "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_output_over_a_file_it_reads_is_refused_even_with_overwrite(setup, capsys):
    """--output naming the dataset or the config file, with --overwrite, replaced the user's data."""
    config, _, _, _, _, root = setup
    data = root / "pairs.jsonl"
    before = {f: f.read_bytes() for f in (config, data)}
    for out, what in ((data, "the dataset file"), (config, "the config file")):
        assert evaluate.main(["--config", str(config), "--output", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"that is {what}" in err[0], err
    assert {f: f.read_bytes() for f in before} == before


def test_output_over_a_runs_records_is_refused_even_with_overwrite(setup, capsys, tmp_path):
    """--run DIR --output DIR/metrics.jsonl (or summary.json, its adapter's files) --overwrite
    replaced the run's record with the evaluation's lines."""
    import shutil

    config, _, _, adapter, _, _ = setup
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    shutil.copytree(adapter, run / "adapter")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (run / "summary.json").write_text('{"steps": 1}\n')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out, what in ((run / "metrics.jsonl", "the run's metrics.jsonl"),
                      (run / "summary.json", "the run's summary.json"),
                      (run / "adapter" / "adapter_config.json", "the adapter's adapter_config.json")):
        assert evaluate.main(["--run", str(run), "--output", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"that is {what}" in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_config_continuing_an_adapter_is_evaluated_against_it_as_trl_does(setup, monkeypatch, capsys, tmp_path):
    """`lora.init_from`: training's reference is the initial adapter (TRL's, for a PEFT model it
    is given); `evaluate` used the base model. Oracle: DPOTrainer.evaluate() with the initial
    adapter as its reference and the evaluated adapter's weights as the policy."""
    import peft
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    config, model, _, initial, tok, root = setup
    torch.manual_seed(7)
    moved = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    moved.save_pretrained(tmp_path / "moved")
    cfg = yaml.safe_load(config.read_text())
    cfg["lora"]["init_from"] = str(initial)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(root)
    out = tmp_path / "o.jsonl"
    summaries = []
    for policy in (initial, tmp_path / "moved"):
        out.unlink(missing_ok=True)
        assert evaluate.main(["--config", str(tmp_path / "c.yaml"), "--adapter", str(policy), "--split", "train",
                              "--output", str(out)]) == 0
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert summaries[0]["rewards/chosen"] == summaries[0]["rewards/rejected"] == 0.0   # policy = reference
    # `use_ref_model` (no ref_model_id): training's reference is a copy of the base, and so is evaluate's.
    for conf, sets in ((config, []), (tmp_path / "c.yaml", ["--set", "post_training.use_ref_model=true"])):
        out.unlink(missing_ok=True)
        assert evaluate.main(["--config", str(conf), "--adapter", str(initial), "--split", "train",
                              "--output", str(out), *sets]) == 0
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert summaries[2]["rewards/margins"] == pytest.approx(summaries[3]["rewards/margins"], abs=1e-6) != 0.0

    rows = [r for r in ROWS if r["chosen"] != r["rejected"]]   # the pair jaxpref counts as skipped
    base = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    trainer = DPOTrainer(model=peft.PeftModel.from_pretrained(base, initial, is_trainable=True),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=2, report_to=[],
                                        use_cpu=True, max_length=64, beta=BETA, bf16=False),
                         train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    peft.set_peft_model_state_dict(trainer.model, load_file(tmp_path / "moved" / "adapter_model.safetensors"))
    theirs = trainer.evaluate()
    assert abs(theirs["eval_rewards/margins"]) > 1e-3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert summaries[1][key] == pytest.approx(theirs[f"eval_{key}"], rel=1e-4, abs=1e-6), key
