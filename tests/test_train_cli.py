"""The `python -m jaxpref.train` contract: outputs, first-step values, dry-run, one-line errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import PAIRS, REPO, write_config
from jaxpref import train
from jaxpref.errors import JaxprefError


def run_cli(args, capsys):
    code = train.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dpo_run_writes_outputs_and_first_step_is_ln2(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    code, _, err = run_cli(["--config", cfg, "--output-dir", tmp_path / "out"], capsys)
    assert code == 0, err
    run = tmp_path / "out" / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["step"] == 1
    # LoRA B = 0: the policy is the reference, so sigmoid DPO starts at ln 2 with zero rewards.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[k] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0
    for k in ("step", "epoch", "learning_rate", "loss", "grad_norm", "rewards/chosen", "rewards/rejected",
              "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
              "logits/rejected", "num_tokens", "tokens_per_second"):
        assert k in first, k
    assert rows[-1]["step"] == 2
    assert rows[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # the LoRA moved
    assert (run / "config.yaml").is_file()
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_time_s"] > 0


def test_failing_model_is_reported_and_next_model_runs(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       models=[{"name": "broken", "huggingface_id": str(tmp_path / "nope")},
                               {"name": "ok", "huggingface_id": str(tiny_llama)}])
    code, _, err = run_cli(["--config", cfg, "--output-dir", tmp_path / "out", "--max-steps", "1"], capsys)
    assert code == 2
    assert "broken" in err and "not found" in err
    assert (tmp_path / "out" / "ok" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "broken" / "adapter").exists()


def test_model_index_and_set_override(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       models=[{"name": "a", "huggingface_id": str(tiny_llama)},
                               {"name": "b", "huggingface_id": str(tiny_llama)}])
    code, _, err = run_cli(["--config", cfg, "--output-dir", tmp_path / "out", "--model-index", "1",
                            "--set", "training.max_steps=1", "--set", "post_training.beta=0.5"], capsys)
    assert code == 0, err
    assert not (tmp_path / "out" / "a").exists()
    import yaml
    saved = yaml.safe_load((tmp_path / "out" / "b" / "config.yaml").read_text())
    assert saved["post_training"]["beta"] == 0.5 and saved["training"]["max_steps"] == 1
    assert [m["name"] for m in saved["models"]] == ["b"]


def one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_dry_run_ok_prints_figures(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    code, out, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    assert code == 0, err
    for needle in ("architecture", "llama", "trainable", "steps/epoch", "p50", "p95", "memory plan",
                   "batches", "truncated"):
        assert needle in out, needle
    # No layout named: the dry run says what `auto` chose on this backend.
    assert "(layout shared_prompt, padding-free (training.pair_layout auto, padding_free auto)" in out, out
    cfg = write_config(tmp_path / "c2.yaml", tiny_llama, tiny_pairs,
                       training={"pair_layout": "concatenated", "padding_free": False})
    code, out, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    assert "(layout concatenated (training.pair_layout concatenated, padding_free false)" in out, out


@pytest.mark.parametrize("finetuning, eval_fraction, needles", [
    ({"early_stopping": {"patience": 2}}, 0.0, ("`finetuning.early_stopping` asks for evaluations", "no eval split")),
    ({"load_best_model_at_end": True}, 0.0, ("`finetuning.load_best_model_at_end` asks for evaluations",)),
])
def test_evaluation_keys_without_eval_data_fail_the_dry_run_as_the_run(tmp_path, tiny_llama, tiny_pairs, capsys,
                                                                       finetuning, eval_fraction, needles):
    """`--dry-run` checks what the run checks: early stopping / the best model with no eval split
    (or one smaller than an eval batch) is the same one-line error, before any weight is read."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, finetuning=finetuning,
                       dataset={"name": str(tiny_pairs), "eval_fraction": eval_fraction})
    for flags in (["--dry-run"], ["--output-dir", tmp_path / "out"]):
        code, _, err = run_cli(["--config", cfg, *flags], capsys)
        err = "\n".join(l for l in err.splitlines() if not l.startswith("[tiny]"))
        one_line_error(code, err, *needles)
    assert not (tmp_path / "out" / "tiny" / "adapter").exists()


@pytest.mark.parametrize("limit, recompute", [(80 << 30, False), (1 << 10, True)])
def test_dry_run_says_what_recompute_auto_chooses_on_an_accelerator(tmp_path, tiny_llama, tiny_pairs, capsys,
                                                                     monkeypatch, limit, recompute):
    """On an accelerator `recompute_activations: auto` stores the activations when the memory plan
    fits the device (`setup.resolve_recompute`); the dry run says what the run will do (it said
    True whatever the plan)."""
    import jax

    device = type("Device", (), {"memory_stats": lambda self: {"bytes_limit": limit}})()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [device])
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    code, out, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.strip().startswith("attention"))
    assert f"recompute_activations {recompute};" in line, line


@pytest.mark.parametrize("precision, said", [("highest", "fp32 matmuls highest"),
                                             ("tf32", "fp32 matmuls fp32 (matmul_precision tf32: a CPU has no TF32")])
def test_dry_run_says_tf32_is_fp32_on_a_cpu(precision, said):
    """XLA's CPU computes fp32 products whatever the precision: the dry run says so rather than tf32."""
    import types

    import jax.numpy as jnp

    from jaxpref.config import config_from_dict
    from jaxpref.training.dryrun import attention_line

    cfg = config_from_dict({"models": [{"name": "m", "huggingface_id": "some/model"}], "dataset": {"name": "d.jsonl"},
                            "training": {"matmul_precision": precision}}, "c.yaml")
    args = types.SimpleNamespace(dtype=jnp.float32, num_heads=4, recompute_activations=True)
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1})
    assert said in attention_line(cfg, args, [(1, 4, 64, 16)], mesh)


@pytest.mark.parametrize("where", ["no_tokamax", "tpu"])
@pytest.mark.parametrize("dry", [True, False])
def test_flash_where_no_kernel_runs_is_one_line(tmp_path, tiny_llama, tiny_pairs, capsys, monkeypatch, where, dry):
    """`training.attention: flash` without tokamax (an optional extra) or on a TPU: one line, exit 2,
    in the dry run and the run (both used to end in a ValueError traceback from inside the model)."""
    import jax

    from jaxpref.models import attention, flash

    if where == "no_tokamax":
        monkeypatch.setattr(flash, "tokamax", lambda: None)
        monkeypatch.setattr(attention, "tokamax", lambda: None)
    else:
        monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, training={"attention": "flash", "max_steps": 1})
    code, _, err = run_cli(["--config", cfg, "--output-dir", tmp_path / "o"] + (["--dry-run"] if dry else []), capsys)
    one_line_error(code, err, "`training.attention: flash`", "tokamax" if where == "no_tokamax" else "TPU")

@pytest.mark.parametrize("change,needles", [
    ({"post_training": {"method": "dpo", "beta": -0.1}}, ["post_training.beta", "> 0"]),
    ({"training": {"learnin_rate": 1e-5}}, ["unknown key", "training.learnin_rate", "learning_rate"]),
    ({"lora": {"r": 0}}, ["lora.r"]),
    ({"post_training": {"method": "dpx"}}, ["post_training.method", "dpo"]),
    ({"post_training": {"loss_type": "sigmod"}}, ["loss_type", "sigmoid"]),
    ({"models": []}, ["models", "empty"]),
    ({"training": {"learning_rate": "fast"}}, ["training.learning_rate", "number"]),
    ({"dataset": {"eval_fraction": 0.99}}, ["dataset.eval_fraction", "takes all 16 usable rows"]),
    ({"training": {"learning_rate": float("nan")}}, ["training.learning_rate", "finite number"]),
    ({"post_training": {"beta": float("inf")}}, ["post_training.beta", "finite number"]),
    ({"lora": {"target_modules": ["q_proj", "nonexistent"]}}, ["nonexistent", "q_proj"]),
    ({"training": {"max_shapes": 0}}, ["training.max_shapes", ">= 1"]),
    ({"training": {"vocab_chunk": -8}}, ["training.vocab_chunk", ">= 0"]),
    ({"training": {"padding_free": True, "pair_layout": "packed"}}, ["training.padding_free", "packed"]),
    ({"training": {"padding_free": "yes"}}, ["training.padding_free"]),
    ({"training": {"scan_layers": 3}}, ["training.scan_layers"]),
    ({"training": {"recompute_activations": "sometimes"}}, ["training.recompute_activations"]),
])
def test_dry_run_bad_config_one_line(tmp_path, tiny_llama, tiny_pairs, capsys, change, needles):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, **change)
    code, _, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    one_line_error(code, err, *needles)


def test_dry_run_missing_column_lists_columns(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "chosen_column": "better"})
    code, _, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    one_line_error(code, err, "better", "columns present", "chosen", "rejected", "prompt")


def test_missing_dataset_and_model_one_line(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "absent.jsonl")
    code, _, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    one_line_error(code, err, "absent.jsonl", "not found")
    cfg = write_config(tmp_path / "c.yaml", "some-org/some-model", tiny_pairs)
    code, _, err = run_cli(["--config", cfg, "--max-steps", "1", "--output-dir", tmp_path / "o"], capsys)
    one_line_error(code, err, "some-org/some-model", "local")


def test_config_file_errors(tmp_path, capsys):
    code, _, err = run_cli(["--config", tmp_path / "missing.yaml"], capsys)
    one_line_error(code, err, "not found", "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n    huggingface_id: [unclosed\n")
    code, _, err = run_cli(["--config", bad], capsys)
    one_line_error(code, err, "bad.yaml", "line", "YAML")
    # PyYAML keeps the last of two equal keys: a second `training:` dropped the first's keys silently.
    bad.write_text("models: []\ntraining:\n  learning_rate: 1.0e-3\nlora:\n  r: 4\ntraining:\n  max_steps: 3\n")
    code, _, err = run_cli(["--config", bad], capsys)
    one_line_error(code, err, "bad.yaml", "line 6, column 1", "`training` is given twice")
    from jaxpref.config.parse import read_config_data
    bad.write_text("x: &base {beta: 0.1, method: dpo}\npost_training:\n  <<: *base\n  beta: 0.2\n")
    assert read_config_data(bad)["post_training"] == {"beta": 0.2, "method": "dpo"}   # merge keys still work


@pytest.mark.parametrize("flags,needle", [
    (["--resume", "--overwrite-output-dir"], "--overwrite-output-dir deletes a run folder's previous run and --resume"),
    (["--resume-from", "2", "--overwrite-output-dir"], "and --resume-from continues it"),
    (["--print-config", "--dry-run"], "--dry-run does not apply to --print-config"),
    (["--print-config", "--resume"], "--resume does not apply to --print-config"),
    (["--print-config", "--model-index", "3"], "--model-index does not apply to --print-config"),
])
def test_flags_that_cannot_all_be_obeyed_are_refused(tmp_path, capsys, flags, needle):
    """Each pair used to run with one of its flags silently dropped (--resume won over
    --overwrite-output-dir; --print-config ignored the rest)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: []\n")
    which = ["--print-config", cfg] if flags[0] == "--print-config" else ["--config", cfg]
    code, out, err = run_cli(which + [f for f in flags if f != "--print-config"], capsys)
    one_line_error(code, err, needle)
    assert out == ""
    if "--overwrite-output-dir" in flags:   # the Python API's same flags
        with pytest.raises(JaxprefError, match="overwrite_output_dir deletes .* and resume(_from)? continues"):
            train(str(cfg), overwrite_output_dir=True, resume="--resume" in flags,
                  resume_from=2 if "--resume-from" in flags else None)


def test_a_run_that_would_never_evaluate_is_refused(tmp_path, tiny_llama, tiny_pairs, capsys):
    """`eval_steps` without an eval split trained to the end without a single evaluation and said
    nothing."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, training={"eval_steps": 1})
    code, _, err = run_cli(["--config", cfg, "--output-dir", tmp_path / "o"], capsys)
    one_line_error(code, err, "model `tiny`", "eval")
    assert not (tmp_path / "o" / "tiny" / "metrics.jsonl").exists()


def test_an_eval_split_smaller_than_an_eval_batch_is_evaluated(tmp_path, tiny_llama, tiny_pairs, capsys):
    """As TRL's evaluation (its last batch may be short): 1 eval pair with eval batches of 4 is
    evaluated at every eval step (jaxpref refused it: fewer than one eval batch)."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.05},
                       training={"eval_steps": 1, "max_steps": 2, "per_device_eval_batch_size": 4})
    code, _, err = run_cli(["--config", cfg, "--output-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "o" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(math.isfinite(r["eval_loss"]) for r in evals)
    assert evals[0]["eval_steps_per_second"] == pytest.approx(1 / evals[0]["eval_runtime"], rel=0.02)


def test_module_entry_point_runs_as_subprocess(tmp_path, tiny_llama, tiny_pairs):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, post_training={"beta": 0})
    proc = subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(cfg), "--dry-run"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "post_training.beta" in proc.stderr


def test_full_finetune_trains_all_weights_against_a_frozen_copy(tmp_path, tiny_llama, tiny_pairs, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, lora={"enabled": False},
                       training={"max_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 2})
    code, out, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    assert code == 0 and "full fine-tune" in out and "reference copy" in out
    code, _, err = run_cli(["--config", cfg, "--output-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "o" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # policy == frozen reference
    assert rows[1]["rewards/margins"] != 0.0
    # One compilation of the train step: the state went in sharded otherwise than the step returns
    # it (P(None, None) vs P()), so step 2 compiled it again (and a resumed run's count differed).
    assert [r["compilations"] for r in rows] == [1, 1]
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "tiny" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        diff = (tuned(ids).logits - base(ids).logits).abs().max().item()
    assert diff > 1e-4


def test_skipped_train_and_eval_rows_are_reported(tmp_path, tiny_llama, capsys):
    """Rows skipped from the eval split are counted apart from the train split's, and a real run
    says on its first line how many rows it skipped and truncated."""
    d = tmp_path / "data"
    d.mkdir()
    good = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS]
    bad = [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": None, "rejected": "r"}]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good + bad[:1]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good[:4] + bad))
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, d, dataset={"name": str(d), "eval_split": "test"},
                       training={"max_steps": 1, "eval_steps": 1, "per_device_eval_batch_size": 2})
    assert train.main(["--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rows skipped     1 (chosen equals rejected: 1)" in out
    assert "eval skipped     2 (chosen equals rejected: 1, chosen is null: 1)" in out
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out  # the start line is the log's first (stdout)
    assert ("1 rows skipped: chosen equals rejected 1; 2 eval rows skipped: chosen equals rejected 1, "
            "chosen is null 1") in out
    summary = json.loads((tmp_path / "o" / "tiny" / "summary.json").read_text())
    assert summary["skipped_rows"] == {"chosen equals rejected": 1}
    assert summary["eval_skipped_rows"] == {"chosen equals rejected": 1, "chosen is null": 1}


def test_broken_inputs_are_one_line(tmp_path, tiny_llama, tiny_pairs, capsys):
    """A --set below a plain value, random bytes or a broken header as model.safetensors, an
    unsupported model type (named before the tokenizer is read), a cut metrics.jsonl for the plot."""
    import shutil

    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    code, _, err = run_cli(["--config", cfg, "--dry-run", "--set", "training.max_steps.x=1"], capsys)
    one_line_error(code, err, "training.max_steps", "is a value, not a section")
    code, _, err = run_cli(["--config", cfg, "--dry-run", "--set", "training.max_steps.x.y=1"], capsys)
    one_line_error(code, err, "training.max_steps", "is a value, not a section")
    code, _, err = run_cli(["--config", cfg, "--dry-run", "--set", "models.-1.name=x"], capsys)
    one_line_error(code, err, "models.-1", "not a valid index")
    code, _, err = run_cli(["--config", cfg, "--dry-run", "--max-steps", "0"], capsys)
    one_line_error(code, err, "training.max_steps", ">= 1")
    for name, data in [("garbage", bytes(range(256)) * 64),
                       ("header", (40).to_bytes(8, "little") + b"{not json" + b" " * 200)]:
        model = tmp_path / name
        shutil.copytree(tiny_llama, model)
        (model / "model.safetensors").write_bytes(data)
        for flags in (["--max-steps", "1", "--output-dir", tmp_path / "o"], ["--dry-run"]):
            code, out, err = run_cli(["--config", write_config(tmp_path / "m.yaml", model, tiny_pairs), *flags], capsys)
            one_line_error(code, err, "model.safetensors", "not a safetensors file")
    # The dry run checks tensor names and shapes from the headers, as loading does.
    from safetensors.numpy import load_file, save_file
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_llama, wrong)
    tensors = load_file(str(wrong / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:, :-1].copy()
    save_file(tensors, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(["--config", write_config(tmp_path / "w.yaml", wrong, tiny_pairs), "--dry-run"], capsys)
    one_line_error(code, err, "model.layers.1.mlp.up_proj.weight", "has shape")
    falcon = tmp_path / "falcon"
    shutil.copytree(tiny_llama, falcon)
    conf = json.loads((falcon / "config.json").read_text())
    (falcon / "config.json").write_text(json.dumps({**conf, "model_type": "falcon"}))
    code, _, err = run_cli(["--config", write_config(tmp_path / "f.yaml", falcon, tiny_pairs), "--dry-run"], capsys)
    assert "unsupported model_type `falcon`" in err and "tokenizer" not in err

    notok = tmp_path / "notok"
    shutil.copytree(tiny_llama, notok)
    for f in notok.glob("tok*"):
        f.unlink()
    code, _, err = run_cli(["--config", write_config(tmp_path / "t.yaml", notok, tiny_pairs), "--dry-run"], capsys)
    assert "no tokenizer files in" in err and "tokenizer_id" in err

    from jaxpref.plot import main as plot_main
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert plot_main([str(run)]) == 0 and (run / "metrics.png").is_file()


def test_revision_of_a_local_model_is_one_line(tmp_path, tiny_llama, tiny_pairs, capsys):
    """`models[].revision` checks out a hub revision; for a local folder it would be ignored."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       models=[{"name": "tiny", "huggingface_id": str(tiny_llama), "revision": "v1"}])
    code, _, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    one_line_error(code, err, "is a local folder", "`revision: v1` applies only to a hub id")


@pytest.mark.parametrize("key", ["config_name", "revision"])
def test_hub_keys_of_a_local_dataset_are_one_line(tmp_path, tiny_llama, tiny_pairs, capsys, key):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, dataset={"name": str(tiny_pairs), key: "x"})
    code, _, err = run_cli(["--config", cfg, "--dry-run"], capsys)
    one_line_error(code, err, "is local", f"`dataset.{key}` (x) applies only to a hub dataset")
