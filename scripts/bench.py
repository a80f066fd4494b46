"""Time jaxpref's real training step (and optionally TRL's DPOTrainer on the same work).

    python scripts/bench.py --config configs/quickstart.yaml [--steps 10] [--json OUT] [--vs-trl]

Each side runs in its own subprocess, so peak RSS is measured separately. The jaxpref side builds
the model, data and step exactly as `jaxpref.training.loop` does (setup.model_for/data_for,
setup.loss_spec/ref_mode, step.make_train_step, the batch iterator), times every step with a
host sync, and measures this machine's fp32 matmul peak in the same process. The TRL side trains
the same converted checkpoint (transformers, from the jaxpref cache) on the same jsonl with
DPOTrainer + a PEFT LoraConfig of the same r/alpha/targets, dtype, max_length and batch size, on
CPU, and times its optimizer steps with a callback. Warm-up steps (compilation for jaxpref, the
first allocations for torch) are excluded from the step statistics, and so are jaxpref steps that
compiled a new (T, K) batch shape (listed as `recompile_s`). Both sides also report CPU seconds per
step (user+system), which a busy shared machine disturbs far less than wall time.

Model FLOPs are counted analytically on the shapes the step executes (padding included): the
policy forward and backward (dX of every base matmul, LoRA gradients, attention, the LM head on
the target slots) plus the reference forward.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxpref.runtime.host_memory import tune_malloc

tune_malloc()  # first: its allocator settings must precede the XLA runtime


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (its first model is benchmarked)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (steps that compile a new shape are reported apart)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--vs-trl", action="store_true", help="also time TRL's DPOTrainer on the same work")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override by dotted path, as in jaxpref.train")
    ap.add_argument("--side", choices=("jax", "trl"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def percentiles(ts: list[float]) -> dict:
    import numpy as np
    a = np.asarray(ts)
    return {"step_s_median": float(np.median(a)), "step_s_p10": float(np.percentile(a, 10)),
            "step_s_p90": float(np.percentile(a, 90)), "step_s_min": float(a.min())}


def cpu_s() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def device_peak_gib(mem: dict) -> float | None:
    return round(mem["device_peak_mib"] / 1024, 2) if "device_peak_mib" in mem else None


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


# ------------------------------------------------------------------------------------------ jax


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    """Median fp32 GFLOP/s of one jitted [n,n]x[n,n] matmul on this machine, now."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(ts)) / 1e9


def step_flops(abstract, lora, batch: dict, args, ref_pass: bool) -> float:
    """Matmul FLOPs of one optimizer step on the executed (padded) shapes (`jaxpref.flops`)."""
    from jaxpref.runtime.flops import FlopModel
    G, N, T = batch.input_ids.shape
    K = batch.tgt_ids.shape[-1]
    blocks = batch.blk_idx.shape[-2:] if "blk_idx" in batch else None
    return FlopModel.of(abstract, args, lora).step(N, T, K, G, ref_pass, blocks)


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpref.data import prepare
    from jaxpref.training import setup
    from jaxpref.runtime.memory import peak_memory
    from jaxpref.config import load_config
    from jaxpref.lora.tree import init_lora
    from jaxpref.models import weights
    from jaxpref.training.step import StepOptions, TrainState, compile_ahead, make_train_step
    from jaxpref.training.optim import make_optimizer

    t_setup = time.perf_counter()
    cfg = load_config(args.config, list(args.set))
    tcfg = cfg.training
    entry = cfg.models[0]
    bundle, tok, lspec, abstract = setup.model_for(cfg, 0, training=True)
    prepared = prepare.data_for(cfg, tok)
    spec = setup.loss_spec(cfg)
    mode = setup.ref_mode(cfg, spec, lspec is not None)
    if mode not in ("lora_off", "none", "separate"):
        raise SystemExit(f"bench: reference mode `{mode}` is not benchmarked")
    B, G = tcfg.per_device_train_batch_size, tcfg.gradient_accumulation_steps
    it = setup.iterator_class(cfg)(prepared.train, B, G, tcfg.seed, prepared.layout)
    total = args.warmup + args.steps
    # The shapes the real run would plan (over all its steps), not just the timed ones.
    run_steps = tcfg.total_steps(it.steps_per_epoch)
    planned = setup.plan_shapes(it, cfg, bundle.args, abstract, max(run_steps, total))
    params = bundle.runtime_params(weights.load_params(bundle))
    ref_bundle, ref_params = None, None
    if mode == "separate":
        rid = entry.ref_model_id or entry.huggingface_id
        if rid != entry.huggingface_id:
            from jaxpref.models.source import resolve
            ref_bundle = setup.reference_bundle(cfg, resolve(rid))
            ref_params = ref_bundle.runtime_params(weights.load_params(ref_bundle))
        else:
            ref_bundle, ref_params = setup.reference_bundle(cfg, bundle.source), params
    rng = jax.random.PRNGKey(tcfg.seed)
    lora = init_lora(abstract, lspec, jax.random.fold_in(rng, 1), cfg.source)
    optimizer, schedule = make_optimizer(tcfg, total)
    state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32), jax.random.fold_in(rng, 2))
    opts = StepOptions(spec, 2 * B, ref_mode=mode)
    step_fn = make_train_step(bundle, opts, optimizer, schedule, ref_bundle, dropout=lspec.dropout > 0)
    setup_s = time.perf_counter() - t_setup
    peak_before = matmul_peak_gflops()

    times, user, system, flops, real, slots, trl_tokens, shapes, losses = [], [], [], [], [], [], [], set(), []
    compile_s, recompile_s = None, []
    for i in range(total):
        batch, _ = next(it)
        shape = batch.shape_key
        new_shape = shape not in shapes
        shapes.add(shape)
        c0, t0 = cpu_s(), time.perf_counter()
        if new_shape:  # as the runner does: compile, release the compiler's memory, then run
            compile_ahead(step_fn, state, params, ref_params, batch, None)
        state, m = step_fn(state, params, ref_params, batch, None)
        jax.block_until_ready(m["loss"])
        dt, c1 = time.perf_counter() - t0, cpu_s()
        losses.append(float(m["loss"]))
        if i == 0:
            compile_s = dt
        if i < args.warmup:
            continue
        if new_shape:  # a new (T, K) bucket compiled inside this step: not a step time
            recompile_s.append(dt)
            continue
        times.append(dt)
        user.append(c1[0] - c0[0])
        system.append(c1[1] - c0[1])
        flops.append(step_flops(abstract, state.lora, batch, bundle.args, mode != "none"))
        seg = np.asarray(batch.segment_ids) > 0
        real.append(int(seg.sum()))
        slots.append(int(seg.size))
        trl_tokens.append(batch.trl_token_count())
    if not times:
        raise SystemExit("bench: every timed step compiled a new batch shape; raise --steps")
    peak = max(peak_before, matmul_peak_gflops())
    med = float(np.median(times))
    out = {
        "side": "jaxpref",
        "config": args.config + "".join(f" --set {s}" for s in args.set),
        "layout": prepared.layout.kind,
        "compute_dtype": tcfg.compute_dtype,
        "setup_s": round(setup_s, 2),
        "compile_s": round(compile_s, 2),
        "recompile_s": [round(x, 2) for x in recompile_s],
        **{k: round(v, 3) for k, v in percentiles(times).items()},
        "steps_timed": len(times),
        "cpu_user_s_per_step": round(float(np.median(user)), 3),
        "cpu_sys_s_per_step": round(float(np.median(system)), 3),
        "pairs_per_s": round(B * G / med, 3),
        "real_tokens_per_s": round(float(np.mean(real)) / med, 1),
        "trl_tokens_per_s": round(float(np.mean(trl_tokens)) / med, 1),
        "padding_fraction": round(1 - sum(real) / sum(slots), 3),
        "model_gflop_per_step": round(float(np.mean(flops)) / 1e9, 1),
        "model_gflops": round(float(np.mean(flops)) / med / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "peak_fraction": round(float(np.mean(flops)) / med / 1e9 / peak, 3),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        # Device memory where the backend reports it (GPU, TPU); None on CPU, where RSS is it.
        "device_peak_gib": device_peak_gib(peak_memory()),
        "compiled_shapes": len(shapes),  # distinct (G, N, T, K) batch shapes
        "planned_shapes": [list(x) for x in planned],
        "compilations": int(step_fn._cache_size()) if hasattr(step_fn, "_cache_size") else None,
        "losses": [round(x, 6) for x in losses],
        "malloc_tuned": tune_malloc(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    return out


# ------------------------------------------------------------------------------------------ trl


def run_trl(args) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from jaxpref.config import load_config
    from jaxpref.data.load import load_rows
    from jaxpref.models.source import resolve

    t_setup = time.perf_counter()
    cfg = load_config(args.config, list(args.set))
    tcfg, pt, lo = cfg.training, cfg.post_training, cfg.lora
    if pt.method != "dpo":
        raise SystemExit(f"bench: --vs-trl compares DPO only (config has `{pt.method}`)")
    entry = cfg.models[0]
    path = str(resolve(entry.huggingface_id, entry.revision).path)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[tcfg.compute_dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(entry.tokenizer_id or path)
    ds = load_rows(cfg.dataset)
    ds = ds.select_columns([c for c in ("prompt", "chosen", "rejected") if c in ds.column_names])
    if cfg.dataset.max_samples is not None:
        ds = ds.select(range(min(cfg.dataset.max_samples, len(ds))))
    targets = list(lo.target_modules) if not isinstance(lo.target_modules, str) else lo.target_modules
    peft_cfg = LoraConfig(r=lo.r, lora_alpha=lo.lora_alpha, target_modules=targets,
                          lora_dropout=lo.lora_dropout, use_rslora=lo.use_rslora, task_type="CAUSAL_LM")
    total = args.warmup + args.steps
    tmp = tempfile.mkdtemp(prefix="bench_trl_")
    conf = DPOConfig(output_dir=tmp, per_device_train_batch_size=tcfg.per_device_train_batch_size,
                     gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
                     learning_rate=tcfg.learning_rate, max_steps=total, beta=pt.beta,
                     loss_type=list(cfg.loss_types), max_length=tcfg.max_length, use_cpu=True,
                     report_to="none", save_strategy="no", logging_steps=10**6, seed=tcfg.seed,
                     bf16=tcfg.compute_dtype == "bfloat16", dataloader_num_workers=0,
                     disable_tqdm=True,
                     # TRL defaults to recomputing activations; match the config's choice.
                     gradient_checkpointing=bool(cfg.gradient_checkpointing))

    times: list[float] = []
    cpu: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.c0, self.t0 = cpu_s(), time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            c1 = cpu_s()
            times.append(time.perf_counter() - self.t0)
            cpu.append((c1[0] - self.c0[0], c1[1] - self.c0[1]))

    trainer = DPOTrainer(model=model, args=conf, train_dataset=ds, processing_class=tok,
                         peft_config=peft_cfg, callbacks=[Timer()])
    setup_s = time.perf_counter() - t_setup
    trainer.train()
    timed = times[args.warmup:]
    med = float(np.median(timed))
    B = tcfg.per_device_train_batch_size * tcfg.gradient_accumulation_steps
    return {
        "side": "trl",
        "config": args.config + "".join(f" --set {s}" for s in args.set),
        "compute_dtype": tcfg.compute_dtype,
        "torch_threads": torch.get_num_threads(),
        "setup_s": round(setup_s, 2),
        "first_step_s": round(times[0], 2) if times else None,
        **{k: round(v, 3) for k, v in percentiles(timed).items()},
        "steps_timed": len(timed),
        "cpu_user_s_per_step": round(float(np.median([c[0] for c in cpu[args.warmup:]])), 3),
        "cpu_sys_s_per_step": round(float(np.median([c[1] for c in cpu[args.warmup:]])), 3),
        "pairs_per_s": round(B / med, 3),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


# ------------------------------------------------------------------------------------------ main


def run_side(args, side: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "result.json"
        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--side", side, "--result", str(res)]
        for s in args.set:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not res.exists():
            sys.stderr.write(proc.stdout[-4000:])
            raise SystemExit(f"bench: the {side} side failed (exit {proc.returncode})")
        return json.loads(res.read_text())


def table(rows: list[dict]) -> str:
    head = ("| side | config | step s (median) | p10-p90 s | CPU s/step (user+sys) | pairs/s | ratio to TRL "
            "| model GFLOP/s | of matmul peak | compile s | peak RSS GiB | load |")
    lines = [head, "|" + "---|" * 12]
    trl = next((r for r in rows if r["side"] == "trl"), None)
    for r in rows:
        ratio = f"{trl['step_s_median'] / r['step_s_median']:.2f}x" if trl else "-"
        flops = f"{r['model_gflops']:.0f}" if "model_gflops" in r else "-"
        frac = f"{100 * r['peak_fraction']:.0f}% of {r['matmul_peak_gflops']:.0f}" if "peak_fraction" in r else "-"
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        cpu = f"{r['cpu_user_s_per_step']:.2f}+{r['cpu_sys_s_per_step']:.2f}"
        lines.append(f"| {r['side']} | {r['config']} | {r['step_s_median']:.2f} | {r['step_s_p10']:.2f}-"
                     f"{r['step_s_p90']:.2f} | {cpu} | {r['pairs_per_s']:.2f} | {ratio} | {flops} | {frac} "
                     f"| {comp} | {r['peak_rss_gib']:.2f} | {r['load_avg_1m']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side is not None:
        if args.side == "jax":
            from jaxpref.runtime.no_torch import hide_torch

            hide_torch()  # as jaxpref's command lines do: torch is not part of the measured RSS
        out = run_jax(args) if args.side == "jax" else run_trl(args)
        Path(args.result).write_text(json.dumps(out))
        return 0
    rows = [run_side(args, "jax")]
    if args.vs_trl:
        rows.append(run_side(args, "trl"))
    j = rows[0]
    print(f"jaxpref: compile {j['compile_s']} s, step median {j['step_s_median']} s "
          f"(p10 {j['step_s_p10']}, p90 {j['step_s_p90']}), {j['pairs_per_s']} pairs/s, "
          f"{j['real_tokens_per_s']} real tokens/s, padding {100 * j['padding_fraction']:.1f}%, "
          f"{j['model_gflop_per_step']} GFLOP/step = {j['model_gflops']} GFLOP/s = "
          f"{100 * j['peak_fraction']:.0f}% of the {j['matmul_peak_gflops']} GFLOP/s matmul peak, "
          f"peak RSS {j['peak_rss_gib']} GiB, "
          + (f"device peak {j['device_peak_gib']} GiB, " if j.get("device_peak_gib") is not None else "")
          + f"{j['compiled_shapes']} compiled shape(s), load {j['load_avg_1m']}")
    if args.vs_trl:
        t = rows[1]
        print(f"trl:     step median {t['step_s_median']} s (p10 {t['step_s_p10']}, p90 {t['step_s_p90']}), "
              f"{t['pairs_per_s']} pairs/s, peak RSS {t['peak_rss_gib']} GiB, {t['torch_threads']} torch "
              f"threads, load {t['load_avg_1m']}; jaxpref is {t['step_s_median'] / j['step_s_median']:.2f}x TRL's speed")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
