"""What a person sees and gets: the plain log written to a file or pipe, read line by line; the
terminal bar, read through a pseudo-terminal; the `jaxpref` command and the Python API; small
things (KTO's plot, no empty checkpoints/ folder, .env through python-dotenv)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_config
from jaxpref import train

LINE = re.compile(r"^\[tiny\] step (\d+)/6 \((\d+)%\) \| loss \d\.\d{4} \| acc \d\.\d{3} \| margin -?\d\.\d{4} \| "
                  r"[\d,]+ tok/s \| elapsed \d+:\d\d \| ETA (\d+:\d\d|\?)$")
EVAL = re.compile(r"^\[tiny\] eval at step (\d+)/6 \| eval loss \d\.\d{4} \| eval acc \d\.\d{3} \| "
                  r"eval margin -?\d\.\d{4} \| \d+\.\d s$")


def _config(tmp_path, tiny_llama, tiny_pairs, **training):
    return write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                        dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                        training={"max_steps": 6, "logging_steps": 2, "eval_steps": 3,
                                  "per_device_eval_batch_size": 2, **training},
                        logging={"report_to": [], "progress_bar": True})


@pytest.mark.slow
def test_log_to_a_file_is_one_plain_line_per_logged_step_and_evaluation(tmp_path, tiny_llama, tiny_pairs):
    cfg = _config(tmp_path, tiny_llama, tiny_pairs)
    out = io.StringIO()  # not a terminal, as under SLURM, nohup or `| tee`
    with contextlib.redirect_stdout(out):
        assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 0
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    steps = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    evals = [int(m.group(1)) for m in map(EVAL.match, lines) if m]
    assert steps == [1, 2, 4, 6], lines   # step 1, every logging_steps, the last
    assert evals == [3, 6], lines          # each evaluation once (the last step's is the final one)
    assert lines[0].startswith("[tiny] llama,") and "6 steps" in lines[0]
    assert any(re.match(r"^\[tiny\] compiling the train step for batch shape 1", x) for x in lines)
    assert any(re.match(r"^\[tiny\] compiled in \d+\.\d s$", x) for x in lines)
    done = lines[-1]
    assert done.startswith("[tiny] done in ") and "eval loss" in done and "eval acc" in done, done
    # The ETA leaves compilation out: after step 1 of 6 it is far below the compile time.
    first = next(x for x in lines if LINE.match(x))
    compiled = float(re.search(r"compiled in (\d+\.\d) s", "\n".join(lines)).group(1))
    eta = LINE.match(first).group(3)
    minutes, seconds = map(int, eta.split(":"))
    assert 60 * minutes + seconds < max(compiled / 2, 2), (first, compiled)
    # No checkpoints/ folder without finetuning.save_steps.
    assert not (tmp_path / "out" / "tiny" / "checkpoints").exists()


def _through_a_terminal(args: list[str], cwd: Path) -> str:
    """Run `python -m jaxpref ARGS` on a pseudo-terminal (160 columns) and return what it drew."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "jaxpref", *args], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    out = b""
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], 300)
            chunk = os.read(fd, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


@pytest.mark.slow
def test_terminal_bar_shows_compiling_current_numbers_eta_and_final_eval(tmp_path, tiny_llama, tiny_pairs):
    cfg = _config(tmp_path, tiny_llama, tiny_pairs)
    drawn = _through_a_terminal(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")], tmp_path)
    frames = [f for f in re.split(r"[\r\n]+", drawn) if f.startswith("[tiny]") and "%|" in f]
    assert any("compiling the train step" in f for f in frames), frames
    # Every step drawn with its own numbers: 1/6 ... 6/6, percent and elapsed time.
    for step in range(1, 7):
        assert any(f"| {step}/6, loss" in f and "elapsed" in f and "ETA" in f for f in frames), (step, frames)
    assert any(" 50%|" in f for f in frames)
    assert any("evaluating at step 3" in f for f in frames)
    final = frames[-1]
    assert "6/6" in final and "eval loss" in final and "eval acc" in final, final
    # Not the per-step lines of a file: evaluations are written above the bar, then the done line.
    lines = re.split(r"[\r\n]+", drawn)   # tqdm clears the bar with \r before writing a line above it
    assert not any(re.match(r"\[tiny\] step \d+/6", x) for x in lines)
    assert any(re.match(r"\[tiny\] eval at step 3/6 \| eval loss", x) for x in lines)
    assert any(x.startswith("[tiny] done in") for x in lines)


def test_console_script_and_help_on_every_command(tmp_path):
    script = Path(sys.executable).with_name("jaxpref")
    assert script.is_file(), "uv sync installs the `jaxpref` console script"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and all(c in p.stdout for c in ("train", "evaluate", "export", "plot")), p
    from jaxpref.cli import COMMANDS
    for name in COMMANDS:
        p = subprocess.run([sys.executable, "-m", "jaxpref", name, "--help"], capture_output=True, text=True,
                           env=env, timeout=120, cwd=tmp_path)
        assert p.returncode == 0 and p.stdout.startswith(f"usage: python -m jaxpref {name}"), (name, p.stderr)
    p = subprocess.run([str(script), "trian"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "did you mean `train`" in p.stderr, p.stderr


def test_python_api_takes_a_dict_and_datasets(tmp_path, tiny_llama):
    import datasets

    import jaxpref
    from conftest import PAIRS

    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS]
    config = {"models": [{"name": "api", "huggingface_id": str(tiny_llama)}],
              "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "training": {"max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
                           "max_length": 64, "learning_rate": 1e-3},
              "logging": {"progress_bar": False}}
    with contextlib.redirect_stdout(io.StringIO()):
        out = jaxpref.train(config, output_dir=tmp_path / "runs", train_dataset=datasets.Dataset.from_list(rows * 2),
                            eval_dataset=datasets.Dataset.from_list(rows[:4]))
    assert list(out) == ["api"] and out["api"]["steps"] == 2 and out["api"]["train_pairs"] == 16
    assert out["api"]["final_eval"]["eval_loss"] > 0
    assert json.loads((tmp_path / "runs" / "api" / "summary.json").read_text())["steps"] == 2
    assert "| api |" in (tmp_path / "runs" / "report.md").read_text()   # the report, as the command writes it
    from jaxpref.errors import JaxprefError
    with pytest.raises(JaxprefError, match="--model-index 3 is out of range"):
        jaxpref.train(config, output_dir=tmp_path / "runs", model_index=3,
                      train_dataset=datasets.Dataset.from_list(rows))


@pytest.mark.parametrize("rows,png_dir,code,needle", [
    (b'{"loss": 0.5}\n{"step": 2, "loss": 0.4}\n', False, 0, None),            # a row without `step`
    (b'{"step": 1, "loss": 0.5}\n\xff\xfe\n[1, 2]\n7\n', False, 0, None),    # not UTF-8, not objects
    (b'{"step": 1, "loss": "n/a"}\n{"step": 2, "loss": null}\n', False, 0, None),
    (b'{"step": 1, "loss": 0.5}\n', True, 2, "metrics.png"),               # metrics.png is a folder
])
def test_plot_of_a_hand_edited_metrics_file(tmp_path, capsys, rows, png_dir, code, needle):
    """KeyError, UnicodeDecodeError and IsADirectoryError tracebacks before."""
    from jaxpref.plot import main as plot_main

    (tmp_path / "metrics.jsonl").write_bytes(rows)
    if png_dir:
        (tmp_path / "metrics.png").mkdir()
    assert plot_main([str(tmp_path)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    if needle:
        assert len(err) == 1 and needle in err[0] and err[0].startswith("jaxpref.plot: error: "), err
    else:
        assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_never_replaces_a_users_metrics_png(tmp_path, capsys):
    """A metrics.png that is not a plot of ours is the user's: one not a PNG was overwritten
    without a word, and any PNG was (a screenshot, another program's plot); a plot of ours (its
    PNG carries jaxpref's Software text) is replaced."""
    from jaxpref.plot import main as plot_main

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (tmp_path / "metrics.png").write_text("my notes")
    assert plot_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.png is not a plot of jaxpref's" in err[0], err
    assert (tmp_path / "metrics.png").read_text() == "my notes"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    fig.savefig(tmp_path / "metrics.png")   # the user's own PNG
    plt.close(fig)
    mine = (tmp_path / "metrics.png").read_bytes()
    assert plot_main([str(tmp_path)]) == 2 and (tmp_path / "metrics.png").read_bytes() == mine
    capsys.readouterr()
    (tmp_path / "metrics.png").unlink()
    assert plot_main([str(tmp_path)]) == 0 and plot_main([str(tmp_path)]) == 0   # ours: replaced


def test_kto_plot_shows_kl_instead_of_an_empty_accuracy_panel(tmp_path):
    from jaxpref.plot import panels_for, plot_run

    kto = [{"step": 1, "loss": 0.5, "kl": 0.1, "rewards/margins": 0.2}, {"step": 2, "eval_loss": 0.4, "eval_kl": 0.2}]
    assert panels_for(kto) == ["loss", "kl", "rewards/margins"]
    dpo = [{"step": 1, "loss": 0.5, "rewards/accuracies": 0.5, "rewards/margins": 0.1}]
    assert panels_for(dpo) == ["loss", "rewards/accuracies", "rewards/margins"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto))
    assert plot_run(tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_dotenv_is_read_by_python_dotenv(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXPREF_TEST_A", raising=False)
    monkeypatch.delenv("JAXPREF_TEST_B", raising=False)
    monkeypatch.setenv("JAXPREF_TEST_KEEP", "mine")
    env = tmp_path / ".env"
    env.write_text('export JAXPREF_TEST_A="quoted # not a comment"\nJAXPREF_TEST_B=plain # a comment\n'
                   "JAXPREF_TEST_KEEP=theirs\n")
    train.load_dotenv(env)
    assert os.environ["JAXPREF_TEST_A"] == "quoted # not a comment"
    assert os.environ["JAXPREF_TEST_B"] == "plain"
    assert os.environ["JAXPREF_TEST_KEEP"] == "mine"   # existing variables win


class _Terminal(io.StringIO):
    """stderr as a terminal shows it (tqdm draws its bar only on one)."""

    def __init__(self, fd: int | None = None):
        super().__init__()
        self.fd = fd

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd


@pytest.mark.slow
def test_gguf_conversion_says_so_and_counts_tensors_in_a_terminal(tmp_path, monkeypatch, capsys):
    import torch
    import transformers

    from jaxpref.models import gguf_convert
    from test_model_parity import TINY, _write_gguf

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen3Config(**{**TINY, "vocab_size": 259}, num_key_value_heads=2, head_dim=128))
    gguf = tmp_path / "tiny-qwen3.gguf"
    _write_gguf(model, gguf)
    n = len(model.state_dict())
    # --dry-run reads the config and tokenizer from the GGUF's metadata: nothing dequantised.
    from jaxpref.models.source import resolve
    dry = resolve(str(gguf), cache_root=tmp_path / "dry", weights=False)
    assert (dry.path / "config.json").is_file() and not list((tmp_path / "dry").rglob("*.safetensors"))
    assert dry.model_type == "qwen3" and "converting" not in capsys.readouterr().err
    # A file or a pipe: a line when it starts and one when it ends; the cached one says nothing.
    gguf_convert.convert_gguf(gguf, tmp_path / "plain")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("jaxpref: converting tiny-qwen3.gguf to safetensors, once"), err
    assert re.fullmatch(r"jaxpref: converted tiny-qwen3.gguf in \d+\.\d s", err[1]), err
    gguf_convert.convert_gguf(gguf, tmp_path / "plain")
    assert capsys.readouterr().err == ""
    # A terminal: a bar counts the tensors, in this process ...
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    gguf_convert.convert_gguf(gguf, tmp_path / "tty")
    assert f"{n}/{n}" in term.getvalue() and "converting tiny-qwen3.gguf" in term.getvalue(), term.getvalue()
    # ... and from the child Python that converts when torch is hidden (drawn on our terminal).
    read, write = os.pipe()
    monkeypatch.setattr(sys, "stderr", _Terminal(write))
    gguf_convert._in_child("convert", gguf, tmp_path / "child")
    os.close(write)
    drawn = os.read(read, 1 << 20).decode()
    os.close(read)
    assert f"{n}/{n}" in drawn and "converting tiny-qwen3.gguf" in drawn, drawn
    assert len(list((tmp_path / "child").rglob("model.safetensors"))) == 1


@pytest.mark.parametrize("kwargs,needle", [
    ({"config": 5}, "`config` must be a YAML path, a dict of sections or a jaxpref.config.Config, got int"),
    ({"train_dataset": [{"prompt": "a"}]}, "`train_dataset` must be a datasets.Dataset, got list"),   # AttributeError
    ({"eval_dataset": "eval.jsonl"}, "`eval_dataset` must be a datasets.Dataset, got str"),
    ({"train_dataset": "DICT"}, "(a DatasetDict: pass one of its splits"),   # "missing columns ...; present: train"
    ({"overrides": "training.max_steps=2"}, "`overrides` must be a list"),   # read letter by letter: "--set t"
    ({"model_index": "0"}, "`model_index` must be an integer, got str"),     # TypeError
    ({"output_dir": 5}, "`output_dir` must be a path, got int"),             # trained into ./5
])
def test_python_api_arguments_of_a_wrong_type_are_one_line(tmp_path, monkeypatch, kwargs, needle):
    import datasets

    import jaxpref
    from jaxpref.errors import JaxprefError

    monkeypatch.chdir(tmp_path)
    args = {"config": {"models": [{"name": "m", "huggingface_id": str(tmp_path)}]}, **kwargs}
    if args.get("train_dataset") == "DICT":
        args["train_dataset"] = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}])})
    with pytest.raises(JaxprefError) as e:
        jaxpref.train(**args)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_python_api_takes_a_path_or_a_config(tmp_path):
    """`config` as a YAML path (with overrides) or a Config (copied: the caller's is not changed);
    datasets take the place of `dataset.name`; the output root is the argument, else
    `training.output_dir`, else checkpoints/."""
    import datasets

    from jaxpref import api
    from jaxpref.config import load_config

    path = write_config(tmp_path / "c.yaml", tmp_path / "model", tmp_path / "d.jsonl",
                        training={"output_dir": "runs_here"})
    cfg = api.load(path, overrides=["training.learning_rate=0.5"])
    assert cfg.training.learning_rate == 0.5 and cfg.dataset.name == str(tmp_path / "d.jsonl")
    assert api.output_root(cfg, None) == Path("runs_here") and api.output_root(cfg, "x") == Path("x")
    # `~` (YAML, or `--output-dir=~/x`, which the shell leaves alone) split a run between ./~/ and
    # the home folder: the adapter went to one, the rest to the other.
    cfg.training.output_dir = "~/runs"
    assert api.output_root(cfg, None) == Path.home() / "runs" and api.output_root(cfg, "~/x") == Path.home() / "x"
    mine = load_config(path)
    rows = datasets.Dataset.from_list([{"prompt": "p", "chosen": " a", "rejected": " b"}] * 3)
    got = api.load(mine, train_dataset=rows, eval_dataset=rows.select([0]))
    assert got.dataset.objects["train"] is rows and len(got.dataset.objects["eval"]) == 1
    assert got.dataset.name.startswith("in-memory datasets.Dataset (3 rows") and got.dataset.eval_split == "eval"
    assert mine.dataset.name == str(tmp_path / "d.jsonl") and not mine.dataset.objects   # the caller's Config unchanged
    from jaxpref.data.load import load_rows
    assert load_rows(got.dataset) is rows and len(load_rows(got.dataset, "eval")) == 1
    with pytest.raises(TypeError, match="overrides apply to a path or a dict"):
        api.load(mine, overrides=["training.seed=1"])


def test_plot_of_a_metrics_file_without_step_rows_is_one_line(tmp_path, capsys):
    """Bytes that are not UTF-8, or JSON lines that are no step rows, are one line (exit 2), never
    a traceback; step rows among them still plot."""
    from jaxpref import plot

    for content in (b"\xff\xfe\x00garbage\n", b'3\n["a"]\n{"loss": 1.0}\n', b""):
        (tmp_path / "metrics.jsonl").write_bytes(content)
        assert plot.main([str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no metrics rows" in err[0], err
    (tmp_path / "metrics.jsonl").write_bytes(b'\xff\n3\n{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.5}\n')
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_every_command_module_is_an_attribute_of_the_package():
    """`jaxpref.<command>` loads on first use for every command of `jaxpref COMMAND`."""
    import subprocess
    import sys

    from jaxpref.cli import COMMANDS

    code = ("import jaxpref, sys; names = sys.argv[1:]; "
            "assert all(getattr(jaxpref, n).__name__ == 'jaxpref.' + n for n in names)")
    p = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-500:]


@pytest.mark.parametrize("command, argv", [
    ("evaluate", ["--run", "nope", "--output", "o.jsonl"]),
    ("generate", ["--config", "nope.yaml", "--prompt", "hi", "--output", "o.jsonl"]),
    ("export", ["--run", "nope", "--adapter-out", "x"]),
])
def test_every_command_reads_dotenv(tmp_path, monkeypatch, capsys, command, argv):
    """HF_TOKEN in .env reaches a gated hub model (evaluate, generate) and --push-to-hub (export)."""
    import importlib

    monkeypatch.delenv("JAXPREF_TEST_DOTENV", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("JAXPREF_TEST_DOTENV=from-dotenv\n")
    assert importlib.import_module(f"jaxpref.{command}").main(argv) == 2   # then a one-line error
    assert os.environ.get("JAXPREF_TEST_DOTENV") == "from-dotenv"
    monkeypatch.delenv("JAXPREF_TEST_DOTENV")


def test_output_flags_expand_the_home_folder(tmp_path, monkeypatch):
    """`--output=~/x` reaches the command unexpanded by the shell: it wrote a literal ./~/ folder."""
    from jaxpref import evaluate, export, generate
    from jaxpref.config import load_config
    from jaxpref.errors import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path)
    assert evaluate.parse_args(["--config", "c.yaml", "--output=~/o.jsonl"]).output == f"{home}/o.jsonl"
    assert generate.parse_args(["--config", "c.yaml", "--prompt", "hi", "--output=~/o.jsonl"]).output == \
        f"{home}/o.jsonl"
    args = export.parse_args(["--run", "r", "--adapter-out=~/a", "--merged-out=~/m"], "jaxpref export")
    assert (args.adapter_out, args.merged_out) == (f"{home}/a", f"{home}/m")
    with pytest.raises(ConfigError, match=r"config file .*: is a folder, expected a YAML file"):
        load_config(tmp_path)


def test_a_terminal_without_a_size_gets_plain_lines():
    """`script` without a terminal, or a container's pseudo-terminal before its size is set, is a
    terminal of 0 columns: tqdm draws nothing there (no step, no "compiling"), so such a run
    showed only its first and last lines; it gets the plain lines, a sized terminal the bar."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from jaxpref.training.progress import Bar, make_progress

    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    try:
        for rows, cols, kind in ((0, 0, "Progress"), (24, 80, "Bar")):
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            p = make_progress("tiny", 0, 4, True, stream)
            assert type(p).__name__ == kind, (rows, cols, type(p))
            if isinstance(p, Bar):
                p.bar.close()
    finally:
        stream.close()
        os.close(master)


@pytest.mark.parametrize("var", ["HF_TOKEN", "HUGGINGFACE_TOKEN"])
def test_hub_dataset_gets_the_token(monkeypatch, var):
    """The seed README's `.env` names HUGGINGFACE_TOKEN; models got it, but a hub dataset was loaded
    without a token (datasets reads HF_TOKEN only), so a gated dataset failed with it."""
    import datasets

    from jaxpref.config.schema import DatasetConfig
    from jaxpref.data.load import load_rows

    for v in ("HF_TOKEN", "HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "hf_planted")
    seen = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: seen.update(args=a, **kw) or "rows")
    assert load_rows(DatasetConfig(name="org/gated-prefs", revision="v1")) == "rows"
    assert seen["args"] == ("org/gated-prefs", None) and seen["revision"] == "v1"
    assert seen["token"] == "hf_planted"


@pytest.mark.slow
def test_python_api_trains_the_other_models_when_one_fails(tmp_path, tiny_llama, tiny_pairs):
    """As the command line: a failing model is reported (the report lists it) and the next model
    still trains; then the first failure's error is raised. Before, the API raised at the failing
    model and never trained the models after it (nor wrote the report)."""
    import jaxpref
    from jaxpref.errors import JaxprefError

    config = {"models": [{"name": "broken", "huggingface_id": str(tmp_path / "no_such_model")},
                         {"name": "last", "huggingface_id": str(tiny_llama)}],
              "dataset": {"name": str(tiny_pairs)},
              "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64},
              "logging": {"progress_bar": False, "report_to": []}}
    runs = tmp_path / "runs"
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(JaxprefError, match="no_such_model"):
        jaxpref.train(config, output_dir=runs)
    assert json.loads((runs / "last" / "summary.json").read_text())["steps"] == 1
    report = (runs / "report.md").read_text()
    assert "1/2 model(s) trained" in report and "| last |" in report
    assert "- `broken`:" in report and "no_such_model" in report
