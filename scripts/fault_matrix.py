"""Run a table of bad inputs and faults on a tiny model and count how each was answered:
`python scripts/fault_matrix.py [--work DIR] [--only SUBSTRING] [-v]`.

Every case runs a command line in-process (`jaxpref.train`, `jaxpref.export`) and is classed as
- one-line error: exit 2 and exactly one line on stderr, no traceback;
- counted skip: the run went on and reported the bad rows as skipped;
- recovered: a fault (a crash, a damaged checkpoint) after which the command finished the run;
- traceback: an exception escaped, exit 1, or a traceback on stderr;
- unexpected: any other answer (e.g. a bad value accepted without a word).
Before and after each case the files a user could lose are hashed (the base model, a finished run,
the user's own folders the case points the command at): any change is counted as data lost.
Prints the totals; exit 0 only when there was no traceback, no unexpected answer and no data lost.
Faults that need a tiny file system (a full disk) use a tmpfs and are left out where none can be
mounted (not root).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


@dataclass
class Case:
    name: str
    build: Callable          # (Env) -> (module, argv) ; may prepare files
    expect: str = "error"    # error | skip | recovered
    needles: tuple = ()      # substrings the answer must hold
    protect: Callable = lambda env: []   # extra folders whose files must not change
    needs_tmpfs: bool = False
    check: Callable | None = None        # (env) -> problem or None, after a recovery


@dataclass
class Env:
    work: Path
    model: Path
    data: Path
    finished: Path          # a finished run folder (save_steps: 1), never written by a case
    finished_cfg: Path
    n: int = 0
    tmpfs: Path | None = None
    extra: dict = field(default_factory=dict)

    def dir(self, name: str) -> Path:
        self.n += 1
        p = self.work / "cases" / f"{self.n:03d}-{name}"
        p.mkdir(parents=True)
        return p


# ---------------------------------------------------------------------------------------------
# Case builders


def cfg_case(name, needles=(), expect="error", **sections):
    """A dry run of the tiny config with `sections` merged in."""
    from conftest import write_config

    def build(env):
        d = env.dir("cfg")
        s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in sections.items()}
        if isinstance(s.get("dataset"), dict):
            s["dataset"] = {"name": str(env.data), **s["dataset"]}
        return "train", ["--config", write_config(d / "c.yaml", env.model, env.data, **s), "--dry-run"]
    return Case(name, build, expect, tuple(needles))


def raw_cfg_case(name, text: bytes | str, needles=(), extra_args=()):
    def build(env):
        d = env.dir("raw")
        f = d / "c.yaml"
        f.write_bytes(text if isinstance(text, bytes) else text.replace("MODEL", str(env.model))
                      .replace("DATA", str(env.data)).encode())
        return "train", ["--config", f, "--dry-run", *extra_args]
    return Case(name, build, "error", tuple(needles))


def args_case(name, args, needles=(), dry=True):
    from conftest import write_config

    def build(env):
        d = env.dir("args")
        cfg = write_config(d / "c.yaml", env.model, env.data)
        return "train", ["--config", cfg, *(["--dry-run"] if dry else ["--output-dir", d / "o"]), *args]
    return Case(name, build, "error", tuple(needles))


def model_case(name, edit, needles=(), expect="error"):
    """A copy of the tiny model changed by `edit(folder)`, in a dry run."""
    from conftest import write_config

    def build(env):
        d = env.dir("model")
        m = d / "model"
        shutil.copytree(env.model, m)
        edit(m)
        return "train", ["--config", write_config(d / "c.yaml", m, env.data), "--dry-run"]
    return Case(name, build, expect, tuple(needles))


def data_case(name, make, needles=(), expect="error", suffix="data.jsonl", **sections):
    """A data file or folder made by `make(path, good_rows_text)`, in a dry run."""
    from conftest import write_config

    def build(env):
        d = env.dir("data")
        p = d / suffix
        make(p, env.data.read_text())
        ds = {"name": str(p), **sections.get("dataset", {})}
        rest = {k: v for k, v in sections.items() if k != "dataset"}
        return "train", ["--config", write_config(d / "c.yaml", env.model, p, dataset=ds, **rest), "--dry-run"]
    return Case(name, build, expect, tuple(needles))


def append(extra: bytes | str):
    def make(p: Path, good: str):
        p.write_bytes(good.encode() + (extra if isinstance(extra, bytes) else extra.encode()))
    return make


def rows(*rs):
    return append("".join(json.dumps(r) + "\n" for r in rs))


def edit_json(**changes):
    def edit(m: Path):
        c = json.loads((m / "config.json").read_text())
        c.update(changes)
        (m / "config.json").write_text(json.dumps(c))
    return edit


def write(name: str, content: bytes | str):
    def edit(m: Path):
        (m / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def remove(*names):
    def edit(m: Path):
        for n in names:
            p = m / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return edit


def run_copy(env, name: str, drop=(), damage=None) -> tuple[Path, Path]:
    """A copy of the finished run under a fresh output root, with `drop`ped outputs (a crash
    before they were written) and `damage(run)` applied; -> (output root, run folder)."""
    d = env.dir(name)
    run = d / "o" / "tiny"
    shutil.copytree(env.finished, run, ignore=shutil.ignore_patterns(".lock"))
    for n in drop:
        p = run / n
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if damage:
        damage(run)
    return d / "o", run


def resume_case(name, drop=(), damage=None, expect="recovered", needles=(), extra=()):
    def build(env):
        out, run = run_copy(env, "resume", drop, damage)
        env.extra["run"] = run
        env.extra["protect"] = [run] if expect == "error" else []
        return "train", ["--config", env.finished_cfg, "--output-dir", out, "--resume", *extra]
    return Case(name, build, expect, tuple(needles), protect=lambda env: env.extra["protect"], check=same_as_finished)


def same_as_finished(env) -> str | None:
    """A recovered run ends as the uninterrupted one: the same adapter bytes and losses, finished."""
    run, ref = env.extra["run"], env.finished
    if not (run / "FINISHED").is_file() or not (run / "summary.json").is_file():
        return "not finished"
    name = "adapter/adapter_model.safetensors"
    if (run / name).read_bytes() != (ref / name).read_bytes():
        return "adapter differs"
    losses = lambda r: [(x["step"], x["loss"]) for x in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
                        if "loss" in x]
    return None if losses(run) == losses(ref) else "losses differ"


def export_case(name, out_of, needles=(), extra=(), protect=None, expect="error"):
    """`jaxpref.export --run <finished run>` with outputs given by `out_of(env, case_dir)`."""
    def build(env):
        d = env.dir("export")
        flags = out_of(env, d)
        env.extra["protect"] = [Path(a) for a in flags[1::2] if Path(a).exists()]
        return "export", ["--run", env.finished, *flags, *extra]
    return Case(name, build, expect, tuple(needles), protect=lambda env: env.extra.get("protect", []))


def user_folder(d: Path, name="mine") -> Path:
    p = d / name
    p.mkdir()
    (p / "thesis.tex").write_text("years of work")
    return p


# ---------------------------------------------------------------------------------------------
# The table


def cases() -> list[Case]:
    C = []
    # -- config values (dry run)
    for key, value, needle in [
        ("training.seed", -1, "training.seed"), ("training.seed", 2**32, "training.seed"),
        ("training.seed", "abc", "training.seed"),
        ("training.save_steps", -1, "training.save_steps"), ("training.save_steps", 0, "training.save_steps"),
        ("training.eval_steps", 0, "training.eval_steps"),
        ("training.adam_beta1", 1.0, "adam_beta1"), ("training.adam_beta1", -0.1, "adam_beta1"),
        ("training.adam_beta2", 1.5, "adam_beta2"), ("training.adam_epsilon", 0.0, "adam_epsilon"),
        ("training.adam_epsilon", -1e-8, "adam_epsilon"), ("training.learning_rate", 0.0, "learning_rate"),
        ("training.learning_rate", "fast", "learning_rate"), ("training.per_device_train_batch_size", 0, "per_device_train_batch_size"),
        ("training.gradient_accumulation_steps", -1, "gradient_accumulation_steps"),
        ("training.max_steps", 0, "max_steps"), ("training.max_length", 1, "max_length"),
        ("training.warmup_ratio", 2.0, "warmup"), ("training.weight_decay", -1.0, "weight_decay"),
        ("training.lr_scheduler_type", "nope", "lr_scheduler_type"), ("training.optimizer", "lion", "optimizer"),
        ("training.pair_layout", "nope", "pair_layout"), ("training.vocab_chunk", -8, "vocab_chunk"),
        ("training.max_shapes", 0, "max_shapes"), ("training.truncation_mode", "middle", "truncation_mode"),
        ("training.compute_dtype", "float16", "compute_dtype"), ("training.pack_length", 1, "pack_length"),
        ("training.max_prompt_length", 0, "max_prompt_length"),
        ("training.train_sampling_strategy", "nope", "train_sampling_strategy"),
        ("training.scan_layers", 3, "scan_layers"), ("training.padding_free", "yes", "padding_free"),
        ("finetuning.save_total_limit", 0, "save_total_limit"), ("finetuning.save_total_limit", -1, "save_total_limit"),
        ("finetuning.save_steps", 0, "finetuning.save_steps"), ("finetuning.remat_policy", "some", "remat_policy"),
        ("post_training.beta", 0.0, "beta"), ("post_training.beta", -1.0, "beta"),
        ("post_training.beta", float("nan"), "beta"), ("post_training.label_smoothing", 0.6, "label_smoothing"),
        ("post_training.label_smoothing", -0.1, "label_smoothing"), ("post_training.method", "dpx", "method"),
        ("post_training.loss_type", "sigmod", "loss_type"), ("post_training.desirable_weight", 0.0, "desirable_weight"),
        ("post_training.f_divergence_type", "kl", "f_divergence_type"),
        ("post_training.orpo_nll_span", "all", "orpo_nll_span"),
        ("lora.r", 1000, "lora.r"), ("lora.r", 0, "lora.r"), ("lora.r", -1, "lora.r"),
        ("lora.lora_alpha", 0, "lora_alpha"), ("lora.lora_dropout", 1.0, "lora_dropout"),
        ("lora.target_modules", [], "target_modules"), ("lora.target_modules", ["nope"], "nope"),
        ("lora.init", "zero", "lora.init"), ("lora.bias", "all", "lora.bias"),
        ("lora.init_from", "/nonexistent/adapter", "adapter"),
        ("dataset.max_samples", 0, "dataset.max_samples"), ("dataset.max_samples", -3, "dataset.max_samples"),
        ("dataset.eval_fraction", 1.0, "eval_fraction"), ("dataset.eval_fraction", 0.99, "eval_fraction"),
        ("logging.log_level", "loud", "logging.log_level"), ("logging.log_level", 3, "logging.log_level"),
        ("logging.report_to", "nonsense", "report_to"),
        ("gpu.mesh", {"data": 64}, "gpu.mesh"), ("gpu.mesh", {"data": -1, "fsdp": -1}, "gpu.mesh"),
        ("gpu.mesh", {"pipeline": 2}, "gpu.mesh"), ("gpu.device_ids", [7], "gpu.device_ids"),
    ]:
        section, k = key.split(".")
        C.append(cfg_case(f"{key}: {value!r}", [needle], **{section: {k: value}}))
    C += [
        cfg_case("loss_weights negative", ["loss_weights[1]"],
                 post_training={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]}),
        cfg_case("loss_weights length", ["loss_weights"], post_training={"loss_weights": [1.0, 1.0]}),
        cfg_case("exo_pair without smoothing", ["exo_pair"], post_training={"loss_type": "exo_pair"}),
        cfg_case("use_weighting with aot", ["use_weighting"], post_training={"loss_type": "aot", "use_weighting": True}),
        cfg_case("padding_free with packed", ["padding_free"], training={"padding_free": True, "pair_layout": "packed"}),
        cfg_case("kto batch 1", ["KTO"], post_training={"method": "kto"}, training={"per_device_train_batch_size": 1}),
        cfg_case("early stopping metric never logged", ["early_stopping.metric"],
                 dataset={"eval_fraction": 0.25}, training={"eval_steps": 1},
                 finetuning={"early_stopping": {"metric": "eval_accuracy"}}),
        cfg_case("early stopping mode", ["early_stopping.mode"], finetuning={"early_stopping": {"mode": "up"}}),
        cfg_case("early stopping patience 0", ["patience"], finetuning={"early_stopping": {"patience": 0}}),
        cfg_case("early stopping min_delta < 0", ["min_delta"], finetuning={"early_stopping": {"min_delta": -1}}),
        cfg_case("unknown key", ["learnin_rate"], training={"learnin_rate": 1e-5}),
        cfg_case("unknown section", ["trainer"], trainer={"x": 1}),
        cfg_case("models empty", ["models"], models=[]),
        cfg_case("duplicate names", ["used twice"], models=[{"name": "a", "huggingface_id": "x"}, {"name": "a", "huggingface_id": "y"}]),
        cfg_case("name with slash", ["folder name"], models=[{"name": "a/b", "huggingface_id": "x"}]),
        cfg_case("huggingface_id missing", ["huggingface_id"], models=[{"name": "a"}]),
        cfg_case("huggingface_id NUL", ["NUL"], models=[{"name": "a", "huggingface_id": "ab\0c"}]),
        cfg_case("name underivable", ["models[0].name"], models=[{"huggingface_id": "/"}]),
        cfg_case("dataset.name NUL", ["NUL"], dataset={"name": "da\0ta.jsonl"}),
        cfg_case("dataset.name missing", ["dataset.name"], dataset={"name": ""}),
        cfg_case("training a list", ["training"], training=[1, 2]),
        raw_cfg_case("config top level a list", "- 1\n- 2\n", ["top level"]),
        raw_cfg_case("config YAML syntax", "models:\n  - name: x\n    huggingface_id: [unclosed\n", ["YAML"]),
        raw_cfg_case("config not UTF-8", b"models:\n  - name: caf\xe9\n", ["line 2", "UTF-8"]),
        raw_cfg_case("config control character", "models: \x07\n", ["YAML"]),
        args_case("--set below a value", ["--set", "training.max_steps.x=1"], ["is a value"]),
        args_case("--set without =", ["--set", "training.max_steps"], ["KEY=VALUE"]),
        args_case("--set bad index", ["--set", "models.-1.name=x"], ["not a valid index"]),
        args_case("--model-index out of range", ["--model-index", "5"], ["--model-index"]),
        args_case("--max-steps 0", ["--max-steps", "0"], ["max_steps"]),
    ]

    def missing_config(env):
        return "train", ["--config", env.work / "absent.yaml", "--dry-run"]
    C.append(Case("config file missing", missing_config, needles=("not found",)))

    def dotenv(env):
        d = env.dir("dotenv")
        (env.work / ".env").write_bytes(b"HF_TOKEN=abc\nX=\xff\n")
        from conftest import write_config
        return "train", ["--config", write_config(d / "c.yaml", env.model, env.data), "--dry-run"]
    C.append(Case(".env not UTF-8", dotenv, needles=(".env", "line 2")))

    # -- model sources (dry run)
    def cut(m):
        b = (m / "model.safetensors").read_bytes()
        (m / "model.safetensors").write_bytes(b[: len(b) // 2])

    def wrong_shape(m):
        from safetensors.numpy import load_file, save_file
        t = load_file(str(m / "model.safetensors"))
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:, :-1].copy()
        save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})

    C += [
        model_case("only pickle weights", lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"), ["never unpickles"]),
        model_case("safetensors cut short", cut, ["truncated"]),
        model_case("safetensors garbage", write("model.safetensors", bytes(range(256)) * 64), ["not a safetensors file"]),
        model_case("safetensors broken header", write("model.safetensors", (40).to_bytes(8, "little") + b"{not json" + b" " * 200),
                   ["not a safetensors file"]),
        model_case("tensor with a wrong shape", wrong_shape, ["up_proj", "has shape"]),
        model_case("num_attention_heads 0", edit_json(num_attention_heads=0), ["num_attention_heads"]),
        model_case("hidden_size abc", edit_json(hidden_size="abc"), ["hidden_size"]),
        model_case("vocab_size 0", edit_json(vocab_size=0), ["vocab_size"]),
        model_case("num_hidden_layers -1", edit_json(num_hidden_layers=-1), ["num_hidden_layers"]),
        model_case("intermediate_size null", edit_json(intermediate_size=None), ["intermediate_size"]),
        model_case("model_type falcon", edit_json(model_type="falcon"), ["falcon"]),
        model_case("config.json a list", write("config.json", "[1, 2]"), ["config.json", "list"]),
        model_case("config.json a number", write("config.json", "5"), ["config.json"]),
        model_case("config.json not UTF-8", write("config.json", b'{"model_type": "\xff"}'), ["config.json", "UTF-8"]),
        model_case("config.json invalid", write("config.json", "{oops"), ["config.json"]),
        model_case("config.json absent", remove("config.json"), ["config.json"]),
        model_case("index invalid", write("model.safetensors.index.json", "{oops"), ["index.json"]),
        model_case("index without weight_map", write("model.safetensors.index.json", "{}"), ["weight_map"]),
        model_case("index weight_map a list", write("model.safetensors.index.json", '{"weight_map": []}'), ["weight_map"]),
        model_case("index names a missing file", write("model.safetensors.index.json",
                                                       '{"weight_map": {"a": "model-00001.safetensors"}}'), ["model-00001"]),
        model_case("index not UTF-8", write("model.safetensors.index.json", b'{"weight_map": "\xff"}'), ["index.json"]),
        model_case("no tokenizer files", remove("tokenizer.json", "tokenizer_config.json"), ["tokenizer"]),
        model_case("no weights at all", remove("model.safetensors"), ["no readable weights"]),
    ]
    for name, spec, needle in [("model path missing", "/nonexistent/model", "not found"),
                               ("hub id offline", "some-org/some-model", "local"),
                               ("gguf missing", "/nonexistent/m.gguf", "not found"),
                               ("a text file as model", "FILE", "not a .gguf")]:
        def build(env, spec=spec):
            from conftest import write_config
            d = env.dir("src")
            if spec == "FILE":
                spec = d / "weights.txt"
                spec.write_text("x")
            return "train", ["--config", write_config(d / "c.yaml", spec, env.data), "--dry-run"]
        C.append(Case(name, build, needles=(needle,)))

    def empty_model_dir(env):
        from conftest import write_config
        d = env.dir("src")
        (d / "m").mkdir()
        return "train", ["--config", write_config(d / "c.yaml", d / "m", env.data), "--dry-run"]
    C.append(Case("empty model folder", empty_model_dir, needles=("config.json",)))

    # -- data (dry run)
    good = {"prompt": "what is the colour of the sky ?", "chosen": " blue .", "rejected": " green ."}
    C += [
        data_case("bad JSON line", append('{"prompt": "a",,}\n'), ["line 17", "not valid JSON"]),
        data_case("array line", append("[1, 2]\n"), ["line 17", "an array"]),
        data_case("number line", append("5\n"), ["line 17", "a number"]),
        data_case("string line", append('"text"\n'), ["line 17", "a string"]),
        data_case("true line", append("true\n"), ["line 17", "a boolean"]),
        data_case("cut last line", append('{"prompt": "a", "cho'), ["line 17"]),
        data_case("data not UTF-8", append(b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n'), ["line 17", "UTF-8"]),
        data_case("latin-1 csv", lambda p, g: p.write_bytes(b"prompt,chosen,rejected\ncaf\xe9,a,b\n"),
                  ["line 2", "UTF-8"], suffix="data.csv"),
        data_case("gzip not UTF-8", lambda p, g: p.write_bytes(gzip.compress(b'{"prompt": "\xff"}\n')),
                  ["line 1", "UTF-8"], suffix="data.jsonl.gz"),
        data_case("gzip corrupted", lambda p, g: p.write_bytes(b"\x1f\x8b\x08\x00garbage"), ["cannot read"],
                  suffix="data.jsonl.gz"),
        data_case("json document broken", lambda p, g: p.write_text('[\n  {"prompt": "a"},\n  {oops}\n]\n'),
                  ["line 3"], suffix="data.json"),
        data_case("json array of numbers", lambda p, g: p.write_text("[1, 2, 3]\n"), ["missing columns"], suffix="data.json"),
        data_case("empty file", lambda p, g: p.write_text(""), ["empty"]),
        data_case("unsupported extension", lambda p, g: p.write_text(g), ["unsupported file type"], suffix="data.txt"),
        data_case("folder without data files", lambda p, g: (p.mkdir(), (p / "notes.txt").write_text("x")),
                  ["no json/jsonl/parquet/csv/arrow"], suffix="folder"),
        data_case("missing column", lambda p, g: p.write_text(json.dumps({"prompt": "a", "better": "b", "rejected": "c"}) + "\n"),
                  ["missing column", "chosen"]),
        data_case("configured prompt column absent", append(""), ["question"], dataset={"prompt_column": "question"}),
        data_case("eval split absent", append(""), ["split"], dataset={"eval_split": "test"}),
        data_case("every row chosen == rejected",
                  lambda p, g: p.write_text("".join(json.dumps({**good, "rejected": good["chosen"]}) + "\n" for _ in range(8))),
                  ["no usable row"]),
        # counted skips: the run goes on and reports them
        data_case("null line", append("null\n"), ["rows skipped     1"], expect="skip"),
        data_case("chosen null", rows({**good, "chosen": None}), ["chosen is null"], expect="skip"),
        data_case("prompt a number", rows({**good, "prompt": 5}), ["prompt is not a string"], expect="skip"),
        data_case("empty chosen", rows({**good, "chosen": "  "}), ["empty chosen"], expect="skip"),
        data_case("chosen equals rejected", rows({**good, "rejected": good["chosen"]}), ["chosen equals rejected"], expect="skip"),
        data_case("blank lines", append("\n\n\n"), [], expect="ok"),
    ]

    def data_files_nomatch(env):
        from conftest import write_config
        d = env.dir("data")
        return "train", ["--config", write_config(d / "c.yaml", env.model, env.data,
                                                  dataset={"name": "json", "data_files": str(d / "*.jsonl")}), "--dry-run"]
    C.append(Case("data_files glob matches nothing", data_files_nomatch, needles=("dataset",)))

    def missing_data(env):
        from conftest import write_config
        d = env.dir("data")
        return "train", ["--config", write_config(d / "c.yaml", env.model, d / "absent.jsonl"), "--dry-run"]
    C.append(Case("data file missing", missing_data, needles=("not found",)))

    # -- run folders, checkpoints, resume (real runs)
    def out_is_file(env):
        from conftest import write_config
        d = env.dir("out")
        (d / "afile").write_text("mine")
        env.extra["protect"] = [d]
        return "train", ["--config", write_config(d / "c.yaml", env.model, env.data), "--output-dir", d / "afile"]
    C.append(Case("--output-dir is a file", out_is_file, needles=("--output-dir",), protect=lambda e: e.extra["protect"]))

    def out_below_file(env):
        from conftest import write_config
        d = env.dir("out")
        (d / "afile").write_text("mine")
        env.extra["protect"] = [d]
        return "train", ["--config", write_config(d / "c.yaml", env.model, env.data), "--output-dir", d / "afile" / "x"]
    C.append(Case("--output-dir below a file", out_below_file, needles=("--output-dir",), protect=lambda e: e.extra["protect"]))

    def fresh_over(drop):
        def build(env):
            out, run = run_copy(env, "fresh", drop)
            env.extra["protect"] = [run]
            return "train", ["--config", env.finished_cfg, "--output-dir", out]
        return build
    C.append(Case("fresh run over a finished run", fresh_over(()), needles=("--resume", "--overwrite-output-dir"),
                  protect=lambda e: e.extra["protect"]))
    C.append(Case("fresh run over checkpoints only", fresh_over(("adapter", "summary.json", "FINISHED", "metrics.jsonl",
                                                                "metrics.png")),
                  needles=("--resume", "--overwrite-output-dir"), protect=lambda e: e.extra["protect"]))

    def locked(env):
        out, run = run_copy(env, "locked", ("FINISHED",))
        code = ("import sys, time; from pathlib import Path; from jaxpref.training.rundir import lock_run_dir; "
                f"lock_run_dir(Path({str(run)!r})); print('held', flush=True); time.sleep(600)")
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert p.stdout.readline().strip() == "held"
        env.extra["cleanup"] = p
        env.extra["protect"] = [run]
        return "train", ["--config", env.finished_cfg, "--output-dir", out, "--resume"]
    C.append(Case("second writer on a locked run", locked, needles=("another run", "PID"),
                  protect=lambda e: e.extra["protect"]))

    def user_adapter(run):
        (run / "adapter" / "notes.txt").write_text("mine")
    C += [
        resume_case("resume after a crash before the adapter", drop=("adapter", "summary.json", "FINISHED", "metrics.png")),
        resume_case("resume after a crash before the summary", drop=("summary.json", "FINISHED", "metrics.png")),
        resume_case("resume with a half-written adapter", drop=("summary.json", "FINISHED"),
                    damage=lambda r: (shutil.copytree(r / "adapter", r / ".adapter.jaxpref-tmp-999999"),
                                      (r / ".adapter.jaxpref-tmp-999999" / "adapter_model.safetensors").write_bytes(b"x"))),
        resume_case("resume: latest step lacks state/manifest.ocdbt", drop=("FINISHED",),
                    damage=lambda r: (r / "checkpoints" / "3" / "state" / "manifest.ocdbt").unlink()),
        resume_case("resume: latest step lacks commit_success.txt", drop=("FINISHED",),
                    damage=lambda r: (r / "checkpoints" / "3" / "commit_success.txt").unlink()),
        resume_case("resume: latest step lacks state/_METADATA", drop=("FINISHED",),
                    damage=lambda r: (r / "checkpoints" / "3" / "state" / "_METADATA").unlink()),
        resume_case("resume: latest step truncated", drop=("FINISHED",),
                    damage=lambda r: [f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
                                      for f in (r / "checkpoints" / "3").rglob("*") if f.is_file() and f.stat().st_size]),
        resume_case("resume: metrics.jsonl cut mid-row", drop=("adapter", "summary.json", "FINISHED"),
                    damage=lambda r: (r / "metrics.jsonl").write_text((r / "metrics.jsonl").read_text() + '{"step": 9, "lo')),
        resume_case("resume with a changed beta", drop=("FINISHED",), expect="error", needles=("beta", "--resume-force"),
                    extra=("--set", "post_training.beta=0.5")),
        resume_case("resume with user files in adapter/", drop=("FINISHED",), damage=user_adapter, expect="error",
                    needles=("adapter", "not a jaxpref export")),
    ]

    # -- export
    C += [
        export_case("export into a folder of other files", lambda env, d: ["--adapter-out", user_folder(d)],
                    ["--adapter-out", "--overwrite"]),
        export_case("merged export into the base model", lambda env, d: ["--merged-out", env.model], ["base model"]),
        export_case("merged export into the base model, --overwrite", lambda env, d: ["--merged-out", env.model],
                    ["base model"], extra=("--overwrite",)),
        export_case("merged export into another model", lambda env, d: ["--merged-out", shutil.copytree(env.model, d / "m")],
                    ["--merged-out", "--overwrite"]),
        export_case("adapter export into the run folder", lambda env, d: ["--adapter-out", env.finished], ["run folder"],
                    extra=("--overwrite",)),
        export_case("adapter export into a parent of the run", lambda env, d: ["--adapter-out", env.finished.parent],
                    ["run folder"], extra=("--overwrite",)),
        export_case("adapter and merged into one folder", lambda env, d: ["--adapter-out", d / "x", "--merged-out", d / "x"],
                    ["same folder"]),
        export_case("export into a file", lambda env, d: ["--adapter-out", (d / "f").write_text("x") and d / "f"],
                    ["is a file"]),
        export_case("export with nothing to do", lambda env, d: [], ["nothing to do"]),
    ]

    def export_bad_run(env):
        d = env.dir("export")
        return "export", ["--run", d, "--adapter-out", d / "a"]
    C.append(Case("export of a folder that is no run", export_bad_run, needles=("config.yaml",)))

    # -- a full disk (tmpfs)
    def disk_full_train(env):
        from conftest import write_config
        d = env.dir("full")
        out = env.tmpfs / "train"
        return "train", ["--config", write_config(d / "c.yaml", env.model, env.data,
                                                  training={"max_steps": 200, "per_device_train_batch_size": 2,
                                                            "max_length": 64, "seed": 0},
                                                  finetuning={"save_steps": 1}), "--output-dir", out]
    C.append(Case("disk full while saving checkpoints", disk_full_train, needles=("no space left", "--resume"),
                  needs_tmpfs=True))

    def disk_full_export(env):
        out = env.tmpfs / "export"
        shutil.copytree(env.finished / "adapter", out)
        filler = env.tmpfs / "filler"
        free = shutil.disk_usage(env.tmpfs).free
        filler.write_bytes(b"\0" * max(free - 4096, 0))
        env.extra["protect"] = [out]
        return "export", ["--run", env.finished, "--adapter-out", out]
    C.append(Case("disk full while exporting", disk_full_export, needles=("no space left",),
                  protect=lambda e: e.extra["protect"], needs_tmpfs=True))
    return C


# ---------------------------------------------------------------------------------------------
# Running and classing


def digest(paths) -> dict:
    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for f in files:
            if f.name == ".lock":
                continue
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def invoke(module: str, argv) -> tuple[int | str, str, str]:
    from jaxpref import export, train
    fn = {"train": train.main, "export": export.main}[module]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = fn([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            code = "exception"
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


def classify(case: Case, env: Env, code, out: str, err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    if code == "exception" or code == 1 or "Traceback (most recent call last)" in err + out:
        return "traceback"
    if not all(n in "\n".join(lines) + out for n in case.needles):
        return "unexpected"
    if case.expect == "error":
        # Progress lines (`[model] ...`) and warnings may come first; the answer is one line.
        answer = [l for l in lines if not l.startswith(("[", "jaxpref: warning"))]
        return "one-line error" if code == 2 and len(answer) == 1 and ": error:" in answer[0] else "unexpected"
    if case.expect == "skip":
        return "counted skip" if code == 0 and "rows skipped" in out else "unexpected"
    if case.expect == "recovered":
        return "recovered" if code == 0 and (case.check is None or case.check(env) is None) else "unexpected"
    return "ok" if code == 0 else "unexpected"


def mount_tmpfs(path: Path, size: str = "600k") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def setup(work: Path) -> Env:
    from conftest import save_tiny_llama, write_config, write_pairs

    from jaxpref import train
    model = save_tiny_llama(work / "tiny_llama")
    data = write_pairs(work / "pairs.jsonl")
    cfg = write_config(work / "finished.yaml", model, data,
                      training={"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                                "max_length": 64, "seed": 0}, finetuning={"save_steps": 1})
    with contextlib.redirect_stderr(io.StringIO()):
        assert train.main(["--config", str(cfg), "--output-dir", str(work / "finished")]) == 0
    return Env(work, model, data, work / "finished" / "tiny", cfg)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each case's answer")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="jaxpref-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["JAXPREF_CACHE"] = str(work / "cache")
    os.chdir(work)
    env = setup(work)
    tmpfs = work / "tmpfs"
    table = [c for c in cases() if not args.only or args.only in c.name]
    counts: dict[str, int] = {}
    lost, left_out = [], []
    for case in table:
        if case.needs_tmpfs:
            if not mount_tmpfs(tmpfs):
                left_out.append(case.name)
                continue
            env.tmpfs = tmpfs
        env.extra = {}
        try:
            module, argv = case.build(env)
            watched = [env.model, env.finished, *case.protect(env)]
            before = digest(watched)
            code, out, err = invoke(module, argv)
            after = digest(watched)
        finally:
            if "cleanup" in env.extra:
                env.extra["cleanup"].kill()
                env.extra["cleanup"].wait()
            (work / ".env").unlink(missing_ok=True)
            if case.needs_tmpfs:
                subprocess.run(["umount", str(tmpfs)], capture_output=True)
        kind = classify(case, env, code, out, err)
        counts[kind] = counts.get(kind, 0) + 1
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            lost.append((case.name, changed[:3]))
        if args.verbose or kind in ("traceback", "unexpected") or changed:
            last = [l for l in err.strip().splitlines() if l.strip()][-3:]
            why = case.check(env) if case.check and kind == "unexpected" and code == 0 else None
            print(f"[{kind}] {case.name} (exit {code}{', ' + why if why else ''}): "
                  + " | ".join(l[:300] for l in last), flush=True)
    tried = sum(counts.values())
    print(f"\nfault matrix: tried {tried}, one-line errors {counts.get('one-line error', 0)}, counted skips "
          f"{counts.get('counted skip', 0)}, recovered {counts.get('recovered', 0)}, ok {counts.get('ok', 0)}, "
          f"tracebacks {counts.get('traceback', 0)}, unexpected {counts.get('unexpected', 0)}, data lost {len(lost)}")
    if left_out:
        print(f"left out (no tmpfs): {', '.join(left_out)}")
    for name, files in lost:
        print(f"data lost in `{name}`: {', '.join(files)}")
    return 0 if not counts.get("traceback") and not counts.get("unexpected") and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
