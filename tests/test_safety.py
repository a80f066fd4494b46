"""Never lose a user's data; every bad input answered in one line (issue #16).

Each case here failed before the fix: a deleted or overwritten folder, a run that could never be
resumed, a traceback, or an answer that blamed the wrong thing."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, write_config
from jaxpref import train


def one_line(code, err, *needles):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def run_cli(capsys, *args):
    code = train.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def model_copy(tmp_path: Path, tiny_llama: Path, name: str) -> Path:
    p = tmp_path / name
    shutil.copytree(tiny_llama, p)
    return p


def edit_config_json(model: Path, **changes) -> Path:
    c = json.loads((model / "config.json").read_text())
    c.update(changes)
    (model / "config.json").write_text(json.dumps(c))
    return model


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line naming the key, file or line (dry run unless said otherwise)


def _cases():
    """name -> build(tmp, model, data) -> (config sections or (model, data, sections), needles)."""
    def cfg(**sections):
        return lambda tmp, m, d: (m, d, sections)

    def model(edit):
        def build(tmp, m, d):
            p = model_copy(tmp, m, "model")
            edit(p)
            return p, d, {}
        return build

    def data(text: bytes):
        def build(tmp, m, d):
            f = tmp / "data.jsonl"
            f.write_bytes(d.read_bytes() + text)
            return m, f, {}
        return build

    def file(name: str, text: str):
        def build(tmp, m, d):
            (tmp / name).write_text(text)
            return m, tmp / name, {}
        return build

    def no_eos(p):
        c = json.loads((p / "tokenizer_config.json").read_text())
        c.pop("eos_token", None), c.pop("pad_token", None)
        (p / "tokenizer_config.json").write_text(json.dumps(c))
        edit_config_json(p, eos_token_id=None, pad_token_id=None)

    def cut(p):
        b = (p / "model.safetensors").read_bytes()
        (p / "model.safetensors").write_bytes(b[: len(b) - 100])

    def only_bin(p):
        (p / "model.safetensors").rename(p / "pytorch_model.bin")

    def empty_dir(tmp, m, d):
        (tmp / "nodata").mkdir()
        (tmp / "nodata" / "notes.txt").write_text("x")
        return m, tmp / "nodata", {}

    return {
        "seed -1": (cfg(training={"seed": -1}), ["training.seed"]),
        "seed 2**32": (cfg(training={"seed": 2**32}), ["training.seed"]),
        "mesh larger than devices": (cfg(gpu={"mesh": {"data": 64}}), ["gpu.mesh"]),
        "device ids absent": (cfg(gpu={"device_ids": [7]}), ["gpu.device_ids", "[7]"]),
        "lora.r larger than the layer": (cfg(lora={"r": 1000, "target_modules": ["q_proj"]}), ["lora.r", "1000"]),
        "max_samples 0": (cfg(dataset={"max_samples": 0}), ["dataset.max_samples"]),
        "max_samples -3": (cfg(dataset={"max_samples": -3}), ["dataset.max_samples"]),
        "save_total_limit 0": (cfg(finetuning={"save_steps": 1, "save_total_limit": 0}),
                               ["finetuning.save_total_limit"]),
        "save_steps -1": (cfg(training={"save_steps": -1}), ["training.save_steps"]),
        "adam_beta1 1.0": (cfg(training={"adam_beta1": 1.0}), ["training.adam_beta1"]),
        "adam_beta1 -0.1": (cfg(training={"adam_beta1": -0.1}), ["training.adam_beta1"]),
        "adam_epsilon 0": (cfg(training={"adam_epsilon": 0.0}), ["training.adam_epsilon"]),
        "negative loss_weights": (cfg(post_training={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]}),
                                  ["post_training.loss_weights[1]"]),
        "lora.init_from with lora.enabled false": (  # the adapter was never read: the base was fully fine-tuned
            cfg(lora={"enabled": False, "init_from": "/some/adapter"}), ["lora.init_from", "lora.enabled: false"]),
        "model named as a report file": (  # trained, then the report was not written (a folder in its place)
            lambda tmp, m, d: (m, d, {"models": [{"name": "report.md", "huggingface_id": str(m)}]}),
            ["`models[0].name` `report.md` is a file the report writes"]),
        "loss_type an empty list": (cfg(post_training={"loss_type": []}), ["post_training.loss_type", "empty list"]),
        "loss_weights all 0": (cfg(post_training={"loss_type": ["sigmoid", "sft"], "loss_weights": [0.0, 0.0]}),
                               ["post_training.loss_weights", "all 0"]),
        "log_level nonsense": (cfg(logging={"log_level": "loud"}), ["logging.log_level", "debug"]),
        "label_smoothing 0.6": (cfg(post_training={"label_smoothing": 0.6}), ["post_training.label_smoothing"]),
        "early stopping metric never logged": (
            cfg(dataset={"eval_fraction": 0.25}, training={"eval_steps": 1},
                finetuning={"early_stopping": {"metric": "eval_rewards/accuracy"}}),
            ["finetuning.early_stopping.metric", "eval_rewards/accuracies"]),
        # Evaluations asked for that would silently never run (the dry run passed early stopping too).
        "eval_steps without an eval split": (cfg(training={"eval_steps": 1}),
                                             ["`training.eval_steps` asks for evaluations", "no eval split"]),
        "eval_strategy epoch without an eval split": (cfg(training={"eval_strategy": "epoch"}),
                                                      ["`training.eval_strategy`", "no eval split"]),
        "early stopping without an eval split": (cfg(finetuning={"early_stopping": {"patience": 2}}),
                                                 ["`finetuning.early_stopping`", "no eval split"]),
        "ref_model_id without use_ref_model": (  # silently ignored before (TRL refuses ref_model with LoRA)
            lambda tmp, m, d: (m, d, {"models": [{"name": "tiny", "huggingface_id": str(m), "ref_model_id": str(m)}]}),
            ["`models[0].ref_model_id` names a separate reference model", "use_ref_model: true"]),
        "ref_model_id not found, with use_ref_model": (  # the dry run said OK; training failed
            lambda tmp, m, d: (m, d, {"models": [{"name": "tiny", "huggingface_id": str(m), "ref_model_id": str(tmp / "nope")}],
                                      "post_training": {"use_ref_model": True}}),
            ["nope", "not found"]),
        "sample_prompts file with a prompt that is a number": (  # the dry run said OK; the run failed at its start
            lambda tmp, m, d: ((tmp / "sp.jsonl").write_text('{"prompt": "hi"}\n{"prompt": 5}\n'),
                               (m, d, {"logging": {"sample_prompts": str(tmp / "sp.jsonl")}}))[1],
            ["logging.sample_prompts", "sp.jsonl", "line 2", "`prompt` must be a string"]),
        "tokenizer without eos and pad tokens": (model(no_eos), ["tokenizer", "has no eos_token"]),   # trained without
        "only pickle weights": (model(only_bin), ["pytorch_model.bin", "never unpickles"]),
        "safetensors cut short": (model(cut), ["model.safetensors", "truncated"]),
        "num_attention_heads 0": (model(lambda p: edit_config_json(p, num_attention_heads=0)),
                                  ["config.json", "num_attention_heads"]),
        "hidden_size abc": (model(lambda p: edit_config_json(p, hidden_size="abc")), ["config.json", "hidden_size"]),
        "config.json a list": (model(lambda p: (p / "config.json").write_text("[1, 2]")), ["config.json", "list"]),
        # Tracebacks from deep in the forward before (a ValueError escaped the dry run), or blamed on
        # the tokenizer (transformers checks config.json's values while loading it).
        "num_key_value_heads not dividing the heads": (model(lambda p: edit_config_json(p, num_key_value_heads=3)),
                                                      ["config.json", "num_attention_heads", "num_key_value_heads"]),
        "rope scaling of an unsupported kind": (
            model(lambda p: edit_config_json(p, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
            ["config.json", "rope scaling `dynamic`"]),
        "hidden_act unknown": (model(lambda p: edit_config_json(p, hidden_act="relu7")),
                               ["config.json", "`hidden_act: relu7`"]),
        "rms_norm_eps a string": (model(lambda p: edit_config_json(p, rms_norm_eps="x")),
                                  ["config.json:", "rms_norm_eps"]),
        "config.json not UTF-8": (model(lambda p: (p / "config.json").write_bytes(b'{"model_type": "\xff"}')),
                                  ["config.json", "UTF-8"]),
        "index invalid": (model(lambda p: (p / "model.safetensors.index.json").write_text("{oops")),
                          ["model.safetensors.index.json"]),
        "index without weight_map": (model(lambda p: (p / "model.safetensors.index.json").write_text("{}")),
                                     ["model.safetensors.index.json", "weight_map"]),
        "model name with NUL": (lambda tmp, m, d: ("abc\0def", d, {}), ["models[0].huggingface_id", "NUL"]),
        "bad JSON line": (data(b'{"prompt": "a", "chosen": "b",,}\n'), ["data.jsonl", "line 17", "not valid JSON"]),
        "array line": (data(b"[1, 2]\n"), ["data.jsonl", "line 17", "an array"]),
        "number line": (data(b"5\n"), ["data.jsonl", "line 17", "a number"]),
        "data not UTF-8": (data(b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n'),
                           ["data.jsonl", "line 17", "UTF-8"]),
        "folder without data files": (empty_dir, ["nodata", "no json/jsonl/parquet/csv/arrow files"]),
        # Lines Python's json reads and Arrow refuses: named by Arrow without the line (a 0-based "row
        # 16" inside "An error occurred while generating the dataset", or "Value is too big!").
        "key given twice on a line": (data(b'{"prompt": "a", "chosen": " b", "chosen": " c", "rejected": " d"}\n'),
                                      ["data.jsonl", "line 17", "key `chosen` is given twice"]),
        "integer beyond 64 bits": (data(b'{"prompt": 1' + b"0" * 30 + b', "chosen": "a", "rejected": "b"}\n'),
                                   ["data.jsonl", "line 17", "does not fit in 64 bits"]),
        "data_files of two types": (  # the CSV was read as JSON: "Invalid value. in row 0", no file named
            lambda tmp, m, d: ((tmp / "b.csv").write_text("prompt,chosen,rejected\na,b,c\n"),
                               (m, d, {"dataset": {"name": "json", "data_files": [str(d), str(tmp / "b.csv")]}}))[1],
            ["dataset.data_files", "b.csv is a .csv file", "read as json"]),
        # datasets' 'Instruction "train" corresponds to no data!' before.
        "csv with a header only": (file("d.csv", "prompt,chosen,rejected\n"), ["d.csv", "has no rows"]),
        "jsonl of blank lines": (file("d.jsonl", "\n\n\n"), ["d.jsonl", "has no rows"]),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_in_the_dry_run(name, tmp_path, tiny_llama, tiny_pairs, capsys):
    build, needles = CASES[name]
    model, data, sections = build(tmp_path, tiny_llama, tiny_pairs)
    if "dataset" in sections:
        sections["dataset"] = {"name": str(data), **sections["dataset"]}
    cfg = write_config(tmp_path / "c.yaml", model, data, **sections)
    code, out, err = run_cli(capsys, "--config", cfg, "--dry-run")
    one_line(code, err, *needles)
    assert "dry run OK" not in out


def test_config_file_and_dotenv_not_utf8(tmp_path, tiny_llama, tiny_pairs, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    cfg.write_bytes(cfg.read_bytes() + b"# caf\xe9\n")
    code, _, err = run_cli(capsys, "--config", cfg, "--dry-run")
    one_line(code, err, "c.yaml", "line", "UTF-8")
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"HF_TOKEN=abc\nX=\xff\n")
    code, _, err = run_cli(capsys, "--config", cfg, "--dry-run")
    one_line(code, err, ".env", "line 2", "UTF-8")


def test_empty_model_name_is_derived_or_refused(tmp_path, tiny_llama, tiny_pairs, capsys, monkeypatch):
    """`huggingface_id: ./` used to name the run folder ``, i.e. the output root itself."""
    from jaxpref.config import load_config
    monkeypatch.chdir(tiny_llama)
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, models=[{"huggingface_id": "./"}])
    assert load_config(cfg).models[0].name == tiny_llama.name
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, models=[{"huggingface_id": "/"}])
    code, _, err = run_cli(capsys, "--config", cfg, "--dry-run")
    one_line(code, err, "models[0].name")


@pytest.mark.parametrize("dry", [False, True])
def test_a_file_where_the_run_keeps_a_folder_is_named(dry, tmp_path, tiny_llama, tiny_pairs, capsys):
    """`<run>/checkpoints` a file: the run failed with NotADirectoryError (exit 1, a traceback in
    error.log), the dry run with a traceback."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    run = tmp_path / "o" / "tiny"
    run.mkdir(parents=True)
    (run / "checkpoints").write_text("mine")
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume",
                           *(["--dry-run"] if dry else []))
    one_line(code, err, "checkpoints is a file", "--output-dir")
    assert (run / "checkpoints").read_text() == "mine" and not (run / "error.log").exists()


def test_output_dir_that_cannot_be_written(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "afile" / "below"):
        code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", out)
        one_line(code, err, "--output-dir", "afile")
    assert (tmp_path / "afile").read_text() == "mine"


def test_disk_full_is_one_line_and_keeps_checkpoints(tmp_path, tiny_llama, tiny_pairs, capsys, monkeypatch):
    """What Orbax raises when the disk fills mid-save; error.log cannot be written either (here: a
    folder stands in its place). One line naming the file, exit 2, the whole checkpoints kept."""
    from jaxpref.training import loop

    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    run = tmp_path / "o" / "tiny"
    (run / "checkpoints" / "3").mkdir(parents=True)
    (run / "error.log").mkdir()
    cut = run / "checkpoints" / "4.orbax-checkpoint-tmp" / "state" / "_sharding"

    def full(*a, **k):
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{cut}": Failed to write 4885 bytes '
                         "to file 7: No space left on device [os_error_code='28']")
    monkeypatch.setattr(loop, "train_model", full)
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume")
    one_line(code, err, "no space left", str(cut), "--resume")
    assert (run / "checkpoints" / "3").is_dir()


# ---------------------------------------------------------------------------------------------
# Run folders: no silent deletion, one writer


def test_fresh_run_over_checkpoints_is_refused(tmp_path):
    from jaxpref.errors import ConfigError
    from jaxpref.training.rundir import claim_run_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "checkpoints" / "4" / "mine").write_text("x")
    with pytest.raises(ConfigError, match="--resume.*--overwrite-output-dir"):
        claim_run_dir(run, resume=False, overwrite=False)
    assert (run / "checkpoints" / "4" / "mine").is_file()
    claim_run_dir(run, resume=True, overwrite=False).release()
    assert (run / "checkpoints" / "4" / "mine").is_file()
    claim_run_dir(run, resume=False, overwrite=True).release()   # asked: deleted
    assert not (run / "checkpoints").exists()
    # An empty folder, or one with only a config from a failed start, is fine.
    claim_run_dir(tmp_path / "new", resume=False, overwrite=False).release()


def test_fresh_run_over_a_finished_run_is_refused_by_the_cli(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    run = tmp_path / "o" / "tiny"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o")
    one_line(code, err, "already holds a run", "--resume", "--overwrite-output-dir")
    assert (run / "checkpoints" / "2").is_dir() and (run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("layout", ["run is the model", "run holds the model", "run holds the data"])
def test_a_run_folder_that_is_or_holds_an_input_is_refused(tmp_path, tiny_llama, tiny_pairs, capsys, layout):
    """`--output-dir` the model's parent and no `name` (derived from the folder) trained into the
    base model's own folder; a run folder holding it, with --overwrite-output-dir, deleted a `model/`
    there: the base model."""
    model = model_copy(tmp_path / "proj", tiny_llama, "model") if layout != "run is the model" else \
        model_copy(tmp_path, tiny_llama, "model")
    data = tiny_pairs
    if layout == "run holds the data":
        model = tiny_llama
        (tmp_path / "proj" / "data").mkdir(parents=True)
        data = tmp_path / "proj" / "data"
        shutil.copy(tiny_pairs, data / "pairs.jsonl")
    models = [{"huggingface_id": str(model)}] if layout == "run is the model" else \
        [{"name": "proj", "huggingface_id": str(model)}]
    cfg = write_config(tmp_path / "c.yaml", model, data, models=models)
    before = snapshot(tmp_path / "proj" if layout != "run is the model" else model)
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path, "--overwrite-output-dir")
    what = "the dataset's folder" if layout == "run holds the data" else "the base model's folder"
    one_line(code, err, "run folder", what, "never replaced, even with --overwrite-output-dir")
    assert snapshot(tmp_path / "proj" if layout != "run is the model" else model) == before


def test_second_writer_is_refused(tmp_path, tiny_llama, tiny_pairs, capsys):
    from jaxpref.errors import ConfigError
    from jaxpref.training.rundir import claim_run_dir

    run = tmp_path / "o" / "tiny"
    first = claim_run_dir(run, resume=False, overwrite=False)
    assert (run / ".lock").read_text().split()[0] == str(os.getpid())
    with pytest.raises(ConfigError, match=f"PID {os.getpid()}"):
        claim_run_dir(run, resume=True, overwrite=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume")
    one_line(code, err, "another run", str(os.getpid()))
    first.release()
    claim_run_dir(run, resume=True, overwrite=False).release()


def test_a_killed_writer_leaves_no_lock(tmp_path):
    import subprocess
    import sys

    from jaxpref.training.rundir import claim_run_dir

    run = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from jaxpref.training.rundir import claim_run_dir; "
            f"claim_run_dir(Path({str(run)!r}), False, False); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "held"
    p.kill()
    p.wait()
    claim_run_dir(run, resume=True, overwrite=False).release()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _store(tmp_path, steps=(1, 2)):
    import jax.numpy as jnp

    from jaxpref.training.checkpoint import CheckpointStore, abstract_of

    state = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
    store = CheckpointStore(tmp_path, None, asynchronous=False)
    for k in steps:
        store.save(k, {"a": state["a"] * k, "b": state["b"]}, {"step": k})
    store.wait()
    return store, abstract_of(state)


@pytest.mark.parametrize("missing", ["state/manifest.ocdbt", "commit_success.txt", "state/_METADATA",
                                     "_CHECKPOINT_METADATA", "meta/metadata"])
def test_checkpoint_with_a_missing_file_is_set_aside(tmp_path, missing, capsys):
    store, abstract = _store(tmp_path)
    (store.dir / "2" / missing).unlink()
    step, state, meta = store.restore_latest(abstract)
    assert step == 1 and float(state["a"][1]) == 1.0 and meta["step"] == 1
    err = capsys.readouterr().err
    assert f"no {missing}" in err and "set aside" in err
    aside = [d for d in store.dir.iterdir() if d.name.startswith("unreadable-2-")]
    assert len(aside) == 1   # renamed, never deleted
    store.save(2, state, {"step": 2})   # the step can be saved again
    store.close()
    assert 2 in store.steps()


def test_saving_a_step_already_on_disk_does_nothing(tmp_path):
    """A run resumed from its final checkpoint saves that step again at its end: StepAlreadyExistsError
    on every retry before."""
    store, abstract = _store(tmp_path)
    step, state, meta = store.restore_latest(abstract)
    store.save(step, state, meta)
    store.close()
    assert sorted(d.name for d in store.dir.iterdir() if d.name.isdigit()) == ["1", "2"]


def test_save_total_limit_keeps_that_many(tmp_path):
    import jax.numpy as jnp

    from jaxpref.training.checkpoint import CheckpointStore
    store = CheckpointStore(tmp_path, 2, asynchronous=False)
    for k in range(1, 5):
        store.save(k, {"a": jnp.ones(2) * k}, {"step": k})
    store.close()
    assert store.steps() == [3, 4]


def test_truncate_metrics_drops_the_final_eval_and_replaces_whole(tmp_path):
    from jaxpref.training.checkpoint import last_train_metrics, truncate_metrics

    f = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}, {"step": 2, "eval_loss": 0.65},
            {"step": 3, "loss": 0.5}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    truncate_metrics(f, 2)
    assert [json.loads(l) for l in f.read_text().splitlines()] == rows[:3]
    truncate_metrics(f, 2, final=True)
    assert [json.loads(l) for l in f.read_text().splitlines()] == rows[:2]
    assert last_train_metrics(f) == rows[1]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# A finished run: export and resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama, tiny_pairs):
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tmp / "c.yaml", tiny_llama, tiny_pairs,
                       training={"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                                 "max_length": 64, "seed": 0},
                       finetuning={"save_steps": 1})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / "o")]) == 0
    return cfg, tmp / "o" / "tiny"


def export(*args):
    import contextlib
    import io

    from jaxpref import export as export_cli
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = export_cli.main([str(a) for a in args])
    return code, err.getvalue()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_into_a_folder_of_other_files_is_refused(finished_run, tmp_path):
    _, run = finished_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = export("--run", run, "--adapter-out", mine)
    one_line(code, err, "--adapter-out", "thesis.tex", "--overwrite")
    assert (mine / "thesis.tex").read_text() == "years of work"
    # A previous export of ours is replaced without a flag; --overwrite replaces the rest.
    ours = tmp_path / "ours"
    assert export("--run", run, "--adapter-out", ours)[0] == 0
    assert export("--run", run, "--adapter-out", ours)[0] == 0
    assert snapshot(ours)["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert export("--run", run, "--adapter-out", mine, "--overwrite")[0] == 0
    assert not (mine / "thesis.tex").exists() and (mine / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".jaxpref-" in p.name]


def test_merged_export_never_writes_into_the_base_model(finished_run, tmp_path, tiny_llama):
    _, run = finished_run
    before = snapshot(tiny_llama)
    for extra in ([], ["--overwrite"]):
        code, err = export("--run", run, "--merged-out", tiny_llama, *extra)
        one_line(code, err, "--merged-out", "base model")
    other = model_copy(tmp_path, tiny_llama, "other")
    code, err = export("--run", run, "--merged-out", other)
    one_line(code, err, "--merged-out", "not a jaxpref export", "--overwrite")
    assert snapshot(tiny_llama) == before and snapshot(other) == before
    code, err = export("--run", run, "--adapter-out", run)
    one_line(code, err, "the run folder")


@pytest.mark.parametrize("summary", ["[1, 2]", '{"steps": 3, "final_metrics": ["loss"], "final_eval": 5}'])
def test_export_of_a_run_with_a_hand_edited_summary(finished_run, tmp_path, summary):
    """summary.json (read for the model card) of another shape was an AttributeError/TypeError."""
    _, done = finished_run
    run = tmp_path / "run"
    shutil.copytree(done, run)
    (run / "summary.json").write_text(summary)
    code, err = export("--run", run, "--adapter-out", tmp_path / "a")
    assert code == 0 and "Traceback" not in err, err
    assert (tmp_path / "a" / "README.md").is_file()


@pytest.mark.parametrize("flag,inside,extra", [("--merged-out", "adapter", []),
                                               ("--adapter-out", "checkpoints", ["--overwrite"]),
                                               ("--adapter-out", "adapter", [])])
def test_export_never_writes_inside_the_run_folder(finished_run, flag, inside, extra):
    """--merged-out <run>/adapter replaced the run's trained adapter (an export of ours) with a
    merged model; --overwrite into <run>/checkpoints deleted the checkpoints."""
    _, run = finished_run
    before = snapshot(run)
    code, err = export("--run", run, flag, run / inside, *extra)
    one_line(code, err, flag, "inside the run folder")
    assert snapshot(run) == before


def test_a_crash_while_exporting_leaves_the_previous_export(finished_run, tmp_path, monkeypatch):
    _, run = finished_run
    out = tmp_path / "adapter"
    assert export("--run", run, "--adapter-out", out)[0] == 0
    before = snapshot(out)
    import safetensors.numpy

    def crash(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    code, err = export("--run", run, "--adapter-out", out)
    one_line(code, err, "no space left on device")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".jaxpref-" in p.name]


def test_resume_after_a_crash_before_the_adapter_finishes_the_run(finished_run, tmp_path, capsys):
    """Killed after its final checkpoint, before the adapter and summary: --resume went on failing
    with StepAlreadyExistsError. Now it does the finishing work from that checkpoint."""
    cfg, done = finished_run
    run = tmp_path / "o" / "tiny"
    shutil.copytree(done, run)
    for name in ("adapter", "summary.json", "FINISHED", "metrics.png"):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume")
    assert code == 0, err
    assert "resuming from step 3" in err
    assert snapshot(run / "adapter") == snapshot(done / "adapter")
    assert (run / "metrics.jsonl").read_text() == (done / "metrics.jsonl").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_metrics"]["loss"] > 0
    assert (run / "FINISHED").is_file()


def test_a_refused_resume_keeps_the_run_record(finished_run, tmp_path, capsys):
    """--resume with a changed setting is refused; the run's config.yaml used to be rewritten with
    the refused settings first."""
    cfg, done = finished_run
    run = tmp_path / "o" / "tiny"
    shutil.copytree(done, run)
    (run / "FINISHED").unlink()
    before = snapshot(run)
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume",
                           "--set", "post_training.beta=0.5")
    one_line(code, err, "`beta` changed", "--resume-force")
    after = snapshot(run)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before


@pytest.mark.parametrize("summary", ["{", "[1, 2]"])
def test_resume_of_a_finished_run_with_a_damaged_summary_skips_it(finished_run, tmp_path, capsys, summary):
    """A finished run whose summary.json was cut short or hand-edited: --resume failed with exit 1
    (`JSONDecodeError`, a traceback in error.log). It is skipped, the file named, nothing rewritten."""
    cfg, done = finished_run
    run = tmp_path / "o" / "tiny"
    shutil.copytree(done, run)
    (run / "summary.json").write_text(summary)
    before = snapshot(run)
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume")
    assert code == 0, err
    assert "already finished" in err and "Traceback" not in err
    warn = [l for l in err.splitlines() if l.startswith("jaxpref: warning")]
    assert len(warn) == 1 and str(run / "summary.json") in warn[0], err
    assert not (run / "error.log").exists()
    after = snapshot(run)
    after.pop(".lock", None), before.pop(".lock", None)
    assert after == before


@pytest.mark.parametrize("change,key", [
    ("dataset.max_samples=12", "dataset.max_samples"),                 # other train rows
    ("post_training.label_smoothing=0.2", "post_training.label_smoothing"),   # another loss
    ("training.adam_beta2=0.99", "training.adam_beta2"),               # other updates
    ("post_training.disable_dropout=false", "post_training.disable_dropout")])
def test_resume_refuses_a_changed_setting_of_the_data_loss_or_optimizer(finished_run, tmp_path, capsys, change, key):
    """These settings change the resumed run's numbers (README: data, loss, optimizer are critical);
    --resume took them silently and continued from the checkpoint with other rows or updates."""
    cfg, done = finished_run
    run = tmp_path / "o" / "tiny"
    shutil.copytree(done, run)
    (run / "FINISHED").unlink()
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume", "--set", change)
    one_line(code, err, f"`{key}` changed", "--resume-force")


@pytest.mark.slow
def test_resume_refuses_an_edited_data_file(tmp_path, tiny_llama, tiny_pairs, capsys):
    """The same file name with other rows (or another tokenizer's tokens) is other data: named as
    `train data`, not continued from the checkpoint."""
    data = tmp_path / "pairs.jsonl"
    shutil.copy(tiny_pairs, data)
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, data, training={"max_steps": 2, "seed": 0},
                       finetuning={"save_steps": 1})
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--max-steps", "1")
    assert code == 0, err
    rows = data.read_text().splitlines()
    data.write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")   # two rows swapped
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume")
    one_line(code, err, "`train data` changed", "--resume-force")
    data.write_text("\n".join(rows) + "\n")
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume")
    assert code == 0 and "resuming from step 1" in err, err


def test_resume_force_names_the_settings_it_overrides(finished_run, tmp_path, capsys):
    """--resume-force continued with a changed setting without a word (the dry run named it)."""
    cfg, done = finished_run
    run = tmp_path / "o" / "tiny"
    shutil.copytree(done, run)
    (run / "FINISHED").unlink()
    code, _, err = run_cli(capsys, "--config", cfg, "--output-dir", tmp_path / "o", "--resume-force",
                           "--set", "post_training.label_smoothing=0.2", "--set", "training.adam_beta2=0.99")
    assert code == 0, err
    warn = [l for l in err.splitlines() if "--resume-force" in l]
    assert len(warn) == 1 and "`post_training.label_smoothing`, `training.adam_beta2` changed" in warn[0], err
