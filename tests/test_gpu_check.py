"""The GPU check's own arithmetic (scripts/bench.py, scripts/gpu_check.py), checked on the CPU:
the work-FLOP formula against a real transformers model's parameters, TRL's sequence lengths read
back from every batch layout, and the report's test counts from a run cut short."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import Layout
from jaxpref.data.tokenize import Tokenized

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _script("bench")
gpu_check = _script("gpu_check")

ONE_B = dict(model_type="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=49152,
             tie_word_embeddings=True)


def test_work_flops_of_the_1b_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ONE_B))
    fp = bench.flop_params(str(tmp_path), 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    # per layer: q, o 2048x2048; k, v 2048x512; gate, up, down 2048x8192; + the LM head 49152x2048
    assert fp["P"] == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 49152 * 2048 == 2**30
    assert fp["P_lora"] == 16 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 512))
    assert bench.work_flops(fp, [450, 400]) == 6.0 * (2**30 + fp["P_lora"]) * 850 \
        + 8 * 16 * 2048 * (450**2 + 400**2)
    assert bench.nominal_peak("NVIDIA H100 80GB HBM3", None) == 989e12
    assert bench.nominal_peak("NVIDIA H200", None) == 989e12
    assert bench.nominal_peak("cpu", None) is None


def test_flop_params_count_the_models_matmul_weights(tmp_path):
    """P = every Linear weight of a transformers Llama (the tied head counted as a matmul)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = {**gpu_check.MODELS["tiny"], "vocab_size": 1000, "tie_word_embeddings": True}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(tmp_path)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    fp = bench.flop_params(str(tmp_path), 16, "all-linear")
    assert fp["P"] == linear
    lora = sum(16 * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert fp["P_lora"] == lora


@pytest.mark.parametrize("kind", ["concatenated", "shared_prompt", "packed", "packed_shared_prompt",
                                  "concatenated+pf", "shared_prompt+pf", "shared_prompt+pf2"])
def test_sequence_lengths_read_back_from_every_layout(kind):
    """Over one epoch, the lengths read from the batches are exactly TRL's sequences:
    prompt + chosen and prompt + rejected of every pair."""
    rng = np.random.default_rng(0)
    ids = lambda: [int(x) for x in rng.integers(3, 100, rng.integers(1, 20))]
    n = 16
    data = Tokenized([ids() for _ in range(n)], [ids() for _ in range(n)], [ids() for _ in range(n)])
    kind, pf, streams = kind.partition("+pf")
    layout = Layout(kind, 64, buckets=(32, 64, 128), padding_free=bool(pf), streams=int(streams or 1))
    it = BatchIterator(data, 2, 2, seed=3, layout=layout)
    got = []
    for _ in range(it.steps_per_epoch):
        batch, _ = next(it)
        got += bench.jax_sequence_lengths(batch)
    want = [len(p) + len(c) for p, c in zip(data.prompt, data.chosen)] + \
           [len(p) + len(r) for p, r in zip(data.prompt, data.rejected)]
    assert sorted(got) == sorted(want)


def test_report_counts_tests_of_a_run_cut_short(tmp_path):
    (tmp_path / "tests.log").write_text(
        "jax devices: [CpuDevice(id=0)]\n"
        "tests/test_a.py::test_one PASSED                 [ 10%]\n"
        "tests/test_a.py::test_two[x] FAILED              [ 20%]\n"
        "tests/test_b.py::test_three SKIPPED (no GPU)     [ 30%]\n"
        "[gw1] [ 40%] PASSED tests/test_b.py::test_five\n"  # pytest-xdist's form
        "tests/test_b.py::test_four ")                       # killed mid-test
    (tmp_path / "stages.jsonl").write_text(json.dumps({"name": "tests", "rc": 124, "seconds": 150, "limit": 150}) + "\n")
    gpu_check.report(type("A", (), {"out": str(tmp_path)}))
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["tests"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "2 passed, 1 failed" in md and "124 (timed out)" in md
    # Killed while printing its failures: the tracebacks after the results are not counted.
    with open(tmp_path / "tests.log", "a") as f:
        f.write("\n=========== FAILURES ===========\nE   tests/test_a.py::test_two[x] FAILED\n")
    gpu_check.report(type("A", (), {"out": str(tmp_path)}))
    assert json.loads((tmp_path / "gpu_check.json").read_text())["tests"]["failed"] == 1


def _gpu_check_sh(*args, **env):
    import subprocess
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": "false", **env}, timeout=60)


def test_unknown_mode_is_one_line(tmp_path):
    proc = _gpu_check_sh("extras", OUT=str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_check: unknown mode `extras` (main, extra)"
    assert not list(tmp_path.iterdir())   # nothing written, nothing removed


@pytest.mark.parametrize("case, message", [
    ("out_is_a_file", "OUT={out}/notes.log: is a file, expected a folder for the check's outputs"),
    ("out_holds_other_files", "OUT={out}: holds files that are not a gpu_check's outputs; name a new or empty folder"),
    ("budget_abc", "GPU_CHECK_BUDGET_S=abc: expected a whole number"),
    ("workers_abc", "GPU_CHECK_TEST_WORKERS=-1: expected a whole number"),
    ("tiny_yes", "GPU_CHECK_TINY=yes: expected 0 or 1"),
    ("dtype_bf16", "GPU_CHECK_DTYPE=bf16: expected bfloat16 or float32"),
])
def test_bad_environment_is_one_line_and_touches_no_file(tmp_path, case, message):
    """OUT at a file (it used to become the empty path: the outputs' `rm -f` then ran on /), OUT at
    a folder of the user's own *.log files (they used to be removed), and malformed settings: one
    line, exit 2, every file as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.log").write_text("mine")
    (out / "bench_mine.json").write_text("{}")
    env = {"GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_SITE": str(tmp_path / "site"), "OUT": str(out)}
    env.update({"out_is_a_file": {"OUT": str(out / "notes.log")}, "out_holds_other_files": {},
                "budget_abc": {"GPU_CHECK_BUDGET_S": "abc"}, "workers_abc": {"GPU_CHECK_TEST_WORKERS": "-1"},
                "tiny_yes": {"GPU_CHECK_TINY": "yes"}, "dtype_bf16": {"GPU_CHECK_DTYPE": "bf16"}}[case])
    if case not in ("out_is_a_file", "out_holds_other_files"):   # an earlier check's folder: its outputs go
        (out / "stages.jsonl").write_text("")
    proc = _gpu_check_sh(**env)
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_check: " + message.format(out=out), proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.log", "bench_mine.json"] + (["stages.jsonl"] if (out / "stages.jsonl").exists() else []))
    assert (out / "notes.log").read_text() == "mine" and not (tmp_path / "work").exists()


@pytest.mark.parametrize("flags, message", [
    (["--config", "{d}/nope.yaml"], "config file not found: {d}/nope.yaml"),
    (["--set", "training.attention=flsh"], "`training.attention` is `flsh`, expected one of"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--steps", "-3"], "--steps -3: must be >= 1"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--profile-steps", "0"], "--profile-steps 0: must be >= 1"),
    (["--peak-tflops", "0"], "--peak-tflops 0.0: must be > 0"),
    (["--only", "jax", "--vs-trl"], "--vs-trl times TRL's side, which --only jax leaves out"),
    (["--only", "trl", "--profile", "{d}/prof"], "--profile traces the jaxpref side, which --only trl leaves out"),
    (["--trl-device", "cuda"], "--trl-device cuda: no TRL side runs"),
    (["--vs-trl", "--set", "post_training.method=ipo"], "--vs-trl compares DPO only (`post_training.method` is ipo)"),
    (["--json", "{d}"], "--json {d}: is a directory, expected a file"),
    (["--json", "{d}/c.yaml/x.json"], "--json {d}/c.yaml/x.json: cannot write there"),
    (["--profile", "{d}/c.yaml"], "--profile {d}/c.yaml: is a file, expected a directory"),
    (["--profile", "{d}"], "--profile {d}: holds summary.txt, which is not an earlier profile's"),
])
def test_bench_refuses_bad_flags_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    """Each used to run a whole benchmark first (or a side that failed with a traceback); the
    --json ones lost the results at the end."""
    (tmp_path / "c.yaml").write_text(json.dumps({"models": [{"name": "m", "huggingface_id": "some/model"}],
                                                 "dataset": {"name": "d.jsonl"}}))
    (tmp_path / "summary.txt").write_text("mine")
    flags = [f.format(d=tmp_path) for f in flags]
    argv = ([] if "--config" in flags else ["--config", str(tmp_path / "c.yaml")]) + flags
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: error: ") and "\n" not in err and message.format(d=tmp_path) in err, err
    assert (tmp_path / "summary.txt").read_text() == "mine"


def test_a_sides_input_error_is_one_line_exit_2(tmp_path):
    """An error found by a side (here the model source) is the side's one line, exit 2, not its
    traceback and a second line."""
    import subprocess
    import sys
    (tmp_path / "c.yaml").write_text(json.dumps({"models": [{"name": "m", "huggingface_id": str(tmp_path / "none")}],
                                                 "dataset": {"name": "d.jsonl"}}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(tmp_path / "c.yaml"),
                           "--json", str(tmp_path / "new" / "bench.json")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("bench: error: "), err
    assert str(tmp_path / "none") in err and not (tmp_path / "new").exists()


def test_build_never_replaces_a_model_folder_it_did_not_write(tmp_path, capsys):
    """GPU_CHECK_WORK is the user's to choose: a `model` folder there that no build wrote is not
    removed (it used to be, with shutil.rmtree), one line and exit 2 instead."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_text("mine")
    assert gpu_check.main(["build", str(tmp_path), "--tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a model this check built" in err, err
    assert (tmp_path / "model" / "weights.bin").read_text() == "mine"
