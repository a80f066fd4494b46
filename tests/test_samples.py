"""Samples during training (`logging.sample_prompts`): samples.jsonl holds, for the base model and
at every evaluation and the end, the completions transformers' greedy `generate` gives for the
same prompts, with the run's saved PEFT adapter loaded for the final step."""
from __future__ import annotations

import json

import pytest

from conftest import PAIRS, write_config
from jaxpref import train

NEW = 8
FILE_PROMPTS = ["what is the colour of the sky ?", "is the sun hot ?", "what is one and one ?"]


def hf_greedy(model, tok, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' greedy completions one prompt at a time, cut after the end-of-sequence id."""
    import torch

    out = []
    for p in prompt_ids:
        with torch.no_grad():
            res = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        ids = res[0, len(p):].tolist()
        out.append(ids[:ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids)
    return out


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, tiny_llama, tiny_pairs):
    tmp = tmp_path_factory.mktemp("sampled")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in FILE_PROMPTS))
    cfg = write_config(tmp / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 3, "eval_steps": 2, "per_device_eval_batch_size": 2,
                                 "learning_rate": 0.05},
                       lora={"r": 4, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj"]},
                       logging={"report_to": ["tensorboard"], "progress_bar": False,
                                "sample_prompts": str(prompts), "sample_max_new_tokens": NEW})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / "out")]) == 0
    run = tmp / "out" / "tiny"
    return run, [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_samples_at_start_every_eval_and_end(sampled_run):
    _, rows = sampled_run
    steps = [(r["step"], r["model"]) for r in rows]
    # base once (step 0), tuned at the eval of step 2 and at the end (step 3), three prompts each
    assert steps == [(0, "base")] * 3 + [(2, "tuned")] * 3 + [(3, "tuned")] * 3
    assert [r["prompt"] for r in rows[:3]] == FILE_PROMPTS
    assert all(set(r) == {"step", "model", "prompt", "completion", "completion_ids"} for r in rows)


def test_samples_equal_transformers_generate_base_and_peft(sampled_run, tiny_llama):
    import peft
    import torch
    import transformers

    run, rows = sampled_run
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    ids = [tok(p)["input_ids"] for p in FILE_PROMPTS]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    want_base = hf_greedy(base, tok, ids)
    tuned = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    want_tuned = hf_greedy(tuned, tok, ids)
    assert [r["completion_ids"] for r in rows[:3]] == want_base
    assert [r["completion_ids"] for r in rows[6:]] == want_tuned
    assert want_tuned != want_base   # the adapter changed what the model writes
    assert [r["completion"] for r in rows[6:]] == [tok.decode(x, skip_special_tokens=True) for x in want_tuned]


def test_samples_in_tensorboard_as_a_text_table(sampled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, rows = sampled_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [0, 2, 3]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| model | prompt | completion |")
    assert f"| tuned | {FILE_PROMPTS[0]} | {' '.join(rows[6]['completion'].split())} |" in table


def test_count_takes_eval_prompts(tmp_path, tiny_llama, tiny_pairs):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 1, "eval_steps": 5},
                       logging={"report_to": [], "progress_bar": False, "sample_prompts": 2,
                                "sample_max_new_tokens": 4})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "tiny" / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["model"]) for r in rows] == [(0, "base")] * 2 + [(1, "tuned")] * 2
    assert all(r["prompt"] in {p for p, _, _ in PAIRS} for r in rows)
    assert all(1 <= len(r["completion_ids"]) <= 4 for r in rows)


@pytest.mark.parametrize("logging, message", [
    ({"sample_prompts": 0}, "`logging.sample_prompts` must be a count >= 1"),
    ({"sample_prompts": "nope.jsonl"}, "`logging.sample_prompts`: no such file nope.jsonl"),
    ({"sample_prompts": 2, "sample_max_new_tokens": 0}, "`logging.sample_max_new_tokens` must be >= 1"),
])
def test_bad_sample_settings_are_one_line_errors(tmp_path, tiny_llama, tiny_pairs, capsys, logging, message):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       logging={"report_to": [], "progress_bar": False, **logging})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_a_count_needs_an_eval_split(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       logging={"report_to": [], "progress_bar": False, "sample_prompts": 2})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    assert "takes prompts from the eval split, and there is none" in capsys.readouterr().err


def test_sampling_time_is_left_out_of_eta_and_tokens_per_second(tmp_path, tiny_llama, tiny_pairs, monkeypatch,
                                                                 capsys):
    """Decoding the samples (here slowed by 1.5 s a call) is neither training time in the ETA (the
    step-1 line said "ETA 2:55" for a 40-step run whose steps took ~1 s, after the base samples'
    ~4 s) nor in metrics.jsonl's `tokens_per_second` (the window's tokens over its step time)."""
    import time

    from jaxpref.training.samples import Sampler

    slow = Sampler.sample

    def sample(self, *a, **k):
        time.sleep(1.5)
        return slow(self, *a, **k)

    monkeypatch.setattr(Sampler, "sample", sample)
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 4, "eval_steps": 2, "per_device_eval_batch_size": 2},
                       logging={"report_to": [], "progress_bar": True, "sample_prompts": 1,
                                "sample_max_new_tokens": 2})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "step 1/4" in l)
    eta = line.rsplit("ETA ", 1)[1].split(":")
    # Before: the base samples' 1.5 s counted as step 1's time, so ETA >= 3 x 1.5 s.
    assert int(eta[0]) * 60 + int(eta[1]) < 3, line
    rows = [json.loads(l) for l in (tmp_path / "out" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # Windows 1 and 3 held a 1.5 s sampling (the base samples; the evaluation at step 2's).
    before = 0
    for r in train_rows:
        assert (r["num_tokens"] - before) / r["tokens_per_second"] < 1.0, r   # one step of 2 pairs: < 1 s
        before = r["num_tokens"]
