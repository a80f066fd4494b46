"""Time jaxpref's real training step (and optionally TRL's DPOTrainer on the same work).

    python scripts/bench.py --config configs/quickstart.yaml [--steps 10] [--json OUT] [--vs-trl]
                            [--only jax|trl] [--trl-device auto|cpu|cuda]

`--set training.max_tokens_per_batch=16384` times the token budget's micro-batches
(`jaxpref.data.budget`) on the same pairs per step; compare with the same command without it.

Each side runs in its own subprocess, so peak RSS is measured separately. The jaxpref side builds
the model, data and step exactly as `jaxpref.training.loop` does (setup.model_for/data_for,
setup.loss_spec/ref_mode, step.make_train_step, the batch iterator), times every step with a
host sync, and measures this machine's fp32 matmul peak in the same process. The TRL side trains
the same converted checkpoint (transformers, from the jaxpref cache) on the same jsonl with
DPOTrainer + a PEFT LoraConfig of the same r/alpha/targets, dtype, max_length and batch size, with
`sdpa` attention, on the device jaxpref ran on (`--trl-device auto`: CUDA when the jaxpref side
ran on a GPU, else the CPU), and times its optimizer steps with a callback (synchronising CUDA). Warm-up steps (compilation for jaxpref, the
first allocations for torch) are excluded from the step statistics, and so are jaxpref steps that
compiled a new (T, K) batch shape (listed as `recompile_s`). Both sides also report CPU seconds per
step (user+system), which a busy shared machine disturbs far less than wall time.

Two FLOP counts. `model_gflop_per_step` (jaxpref only) counts what the step executes (padding
included, `jaxpref.runtime.flops`). `model_tflop_per_step` (both sides, hence `mfu`) counts the
work, the same for both: `work_flops` below on the real tokens of the sequences as TRL forms them
(prompt + chosen, prompt + rejected), read from each side's own batches. MFU divides it by the
step time and the device's nominal dense bf16 peak (989 TFLOP/s for an H100 or H200; none on other
devices, or give `--peak-tflops`). Device peak memory: jax `memory_stats()["peak_bytes_in_use"]`,
torch `torch.cuda.max_memory_allocated()`.
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

from jaxpref.errors import ConfigError, JaxprefError, check_writable
from jaxpref.runtime.host_memory import tune_malloc

tune_malloc()  # first: its allocator settings must precede the XLA runtime


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (its first model is benchmarked)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (steps that compile a new shape are reported apart)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--vs-trl", action="store_true", help="also time TRL's DPOTrainer on the same work")
    ap.add_argument("--only", choices=("jax", "trl"), default=None,
                    help="run one side only (its own subprocess; --json gets a one-row list)")
    ap.add_argument("--trl-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="TRL's device; auto: the jaxpref side's (a GPU -> cuda), or with --only trl "
                         "cuda when torch sees one")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="nominal dense peak for MFU (default: 989 on an H100/H200, else no MFU)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the timed steps, trace --profile-steps more under jax.profiler into DIR "
                         "and write DIR/summary.txt (scripts/profile_summary.py; jaxpref side only)")
    ap.add_argument("--profile-steps", type=int, default=2)
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


# ------------------------------------------------------------------------------- work FLOPs, MFU

NOMINAL_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}   # dense bf16 (H100 SXM; H200 has the same)
LORA_SHAPES = {  # module -> (in, out) as functions of the HF config
    "q_proj": lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"]),
    "k_proj": lambda c: (c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]),
    "v_proj": lambda c: (c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]),
    "o_proj": lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"]),
    "gate_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
    "up_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
    "down_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
}


def flop_params(model_dir: str, lora_r: int, targets) -> dict | None:
    """Per-token matmul parameters of a Llama-like checkpoint (config.json): P = every layer's
    q/k/v/o/gate/up/down kernels + the LM head (vocab x hidden, tied or not; the embedding lookup
    is no matmul), P_lora = r x (in + out) per LoRA target per layer. None for other architectures."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    if c.get("model_type") not in ("llama", "mistral", "qwen2"):
        return None
    c = dict(c, head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    per_layer = sum(i * o for i, o in (f(c) for f in LORA_SHAPES.values()))
    targets = list(LORA_SHAPES) if targets == "all-linear" else list(targets)
    lora = sum(lora_r * sum(LORA_SHAPES[t](c)) for t in targets if t in LORA_SHAPES)
    L = c["num_hidden_layers"]
    return {"P": L * per_layer + c["vocab_size"] * c["hidden_size"], "P_lora": L * lora, "layers": L,
            "attn_width": c["num_attention_heads"] * c["head_dim"]}


def work_flops(fp: dict, seq_lens) -> float:
    """FLOPs of one DPO + LoRA step with the frozen base as reference, for sequences of these real
    token counts (TRL's sequences: prompt + chosen, prompt + rejected):
      per token: 6 P (policy forward 2P, policy backward dX 2P, no base dW; reference forward 2P)
                 + 6 P_lora (LoRA forward, dX and dW);
      per sequence of T tokens, per layer: attention forward 4 T^2 d (QK^T and AV, d = heads x
                 head_dim) counted at half for the causal mask = 2 T^2 d, times 4 passes
                 (policy forward 1, policy backward 2, reference forward 1) = 8 T^2 d."""
    tokens = sum(seq_lens)
    attn = 8 * fp["layers"] * fp["attn_width"] * sum(t * t for t in seq_lens)
    return 6.0 * (fp["P"] + fp["P_lora"]) * tokens + attn


def nominal_peak(device_kind: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v * 1e12 for k, v in NOMINAL_PEAK_TFLOPS.items() if k in device_kind), None)


def jax_sequence_lengths(batch) -> list[int]:
    """Real token counts of TRL's sequences in a jaxpref batch (any layout): per original row
    (the attention blocks of a padding-free stream, else each row's segments), branch-0 tokens
    plus each branch's tokens for a shared prompt, else the segment's tokens. Padding-free streams
    leave out each sequence's last token: checked against the batch's own TRL count
    (`trl_token_count`), and added back."""
    import numpy as np
    seg, br = np.asarray(batch.segment_ids), np.asarray(batch.branch)
    blk = getattr(batch, "blk_idx", None)
    groups = []   # (segment ids, branches) of one original row's tokens
    for g in range(seg.shape[0]):
        for r in range(seg.shape[1]):
            if blk is not None:
                for idx in np.asarray(blk)[g, r]:
                    idx = idx[idx >= 0]
                    groups.append((seg[g, r, idx], br[g, r, idx]))
            else:
                groups.append((seg[g, r], br[g, r]))
    lens = []
    for s, b in groups:
        for sid in np.unique(s[s > 0]):
            on = s == sid
            n0, n1, n2 = (int((on & (b == k)).sum()) for k in (0, 1, 2))
            lens += [n0 + n1, n0 + n2] if (n1 or n2) else [n0]
    gap = batch.trl_token_count() - sum(lens)
    if gap == len(lens):
        lens = [t + 1 for t in lens]
    elif gap != 0:
        raise SystemExit(f"bench: cannot read sequence lengths from the batch ({gap} tokens unaccounted)")
    return lens


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
    if getattr(batch, "pair_w", None) is not None:  # a token budget's step: its empty micro-batches are skipped
        import numpy as np
        G = int((np.asarray(batch.pair_w) > 0).any(axis=-1).sum())
    K = batch.tgt_ids.shape[-1]
    blocks = batch.blk_idx.shape[-2:] if getattr(batch, "blk_idx", None) is not None else None
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
        raise ConfigError(f"{args.config}: reference mode `{mode}` is not benchmarked")
    B, G = tcfg.per_device_train_batch_size, tcfg.gradient_accumulation_steps
    # With `--set training.max_tokens_per_batch=N` the token budget's micro-batches (`data.budget`).
    it = setup.train_iterator(cfg, prepared.train, B, G, prepared.layout, whole_steps=True)   # steps of one shape
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
    device = jax.devices()[0]
    fp = flop_params(str(bundle.source.path), cfg.lora.r, cfg.lora.target_modules) if lspec is not None else None

    times, user, system, flops, real, slots, trl_tokens, shapes, losses = [], [], [], [], [], [], [], set(), []
    work, work_tokens, passes = [], [], []
    compile_s, compile_only_s, recompile_s = None, None, []
    for i in range(total):
        batch, _ = next(it)
        shape = batch.shape_key
        new_shape = shape not in shapes
        shapes.add(shape)
        c0, t0 = cpu_s(), time.perf_counter()
        if new_shape:  # as the runner does: compile, release the compiler's memory, then run
            compile_ahead(step_fn, state, params, ref_params, batch, None)
            if i == 0:
                compile_only_s = time.perf_counter() - t0
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
        pw = getattr(batch, "pair_w", None)   # a token budget's step: the micro-batches it runs
        passes.append(int((np.asarray(pw) > 0).any(axis=-1).sum()) if pw is not None else batch.input_ids.shape[0])
        if fp is not None and mode == "lora_off":
            lens = jax_sequence_lengths(batch)
            work.append(work_flops(fp, lens))
            work_tokens.append(sum(lens))
    if not times:
        raise ConfigError(f"--steps {args.steps}: every timed step compiled a new batch shape; raise --steps")
    if args.profile:
        profile_steps(args, it, step_fn, state, params, ref_params, shapes)
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
        # The dry run's estimate (jaxpref.runtime.memory.memory_plan) for the largest shape run.
        "memory_plan_mib": plan_mib(cfg, bundle.args, params, state.lora, shapes),
        "micro_batches_per_step": round(float(np.mean(passes)), 2),
        "compiled_shapes": len(shapes),  # distinct (G, N, T, K) batch shapes
        "planned_shapes": [list(x) for x in planned],
        "compilations": int(step_fn._cache_size()) if hasattr(step_fn, "_cache_size") else None,
        "losses": [round(x, 6) for x in losses],
        "malloc_tuned": tune_malloc(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "compile_only_s": round(compile_only_s, 2) if compile_only_s is not None else None,
        "first_step_s": round(compile_s, 2),
        **work_stats(work, work_tokens, med, nominal_peak(device.device_kind, args.peak_tflops)),
    }
    return out


def profile_steps(args, it, step_fn, state, params, ref_params, shapes) -> None:
    """Trace `--profile-steps` more steps (of shapes already compiled) and summarise the trace."""
    import jax

    sys.path.insert(0, str(Path(__file__).parent))
    import profile_summary

    batches = []
    while len(batches) < args.profile_steps:
        batch, _ = next(it)
        if batch.shape_key in shapes:
            batches.append(batch)
    with jax.profiler.trace(args.profile):
        for batch in batches:
            state, m = step_fn(state, params, ref_params, batch, None)
            jax.block_until_ready(m["loss"])
    s = profile_summary.summarise(Path(args.profile))
    Path(args.profile, "summary.txt").write_text(profile_summary.render(s, 40) + "\n")
    Path(args.profile, "summary.json").write_text(json.dumps(s, indent=1))


def work_stats(work: list[float], tokens: list[int], med: float, peak: float | None) -> dict:
    """Mean work FLOPs and TRL-counted real tokens per timed step, and MFU against `peak`."""
    if not work:
        return {"model_tflop_per_step": None, "model_tokens_per_step": None, "mfu": None, "mfu_peak_tflops": None}
    w = sum(work) / len(work)
    return {"model_tflop_per_step": round(w / 1e12, 4), "model_tokens_per_step": round(sum(tokens) / len(tokens), 1),
            "mfu": round(w / med / peak, 4) if peak else None,
            "mfu_peak_tflops": peak / 1e12 if peak else None}


def plan_mib(cfg, args, params, lora, shapes) -> dict | None:
    """`memory_plan` (the dry run's estimate) for the batch shapes this bench ran."""
    import jax
    from jaxpref.runtime.memory import memory_plan
    count = lambda tree: sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
    try:
        plan = memory_plan(cfg, args, count(params), count(lora), sorted(shapes))
    except Exception as e:  # an estimate must not fail the measurement
        return {"error": f"{type(e).__name__}: {e}"}
    return {key: round(v / 2**20, 1) for key, v in plan.items()}


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
        raise ConfigError(f"{args.config}: --vs-trl compares DPO only (`post_training.method` is {pt.method})")
    entry = cfg.models[0]
    path = str(resolve(entry.huggingface_id, entry.revision).path)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[tcfg.compute_dtype]
    device = args.trl_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--trl-device cuda: torch sees no CUDA device")
    cuda = device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
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
                     loss_type=list(cfg.loss_types), max_length=tcfg.max_length, use_cpu=not cuda,
                     report_to="none", save_strategy="no", logging_steps=10**6, seed=tcfg.seed,
                     bf16=tcfg.compute_dtype == "bfloat16", dataloader_num_workers=0,
                     disable_tqdm=True,
                     # TRL defaults to recomputing activations; match the config's choice.
                     gradient_checkpointing=bool(cfg.gradient_checkpointing))

    times: list[float] = []
    cpu: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.c0, self.t0 = cpu_s(), time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            c1 = cpu_s()
            times.append(time.perf_counter() - self.t0)
            cpu.append((c1[0] - self.c0[0], c1[1] - self.c0[1]))

    trainer = DPOTrainer(model=model, args=conf, train_dataset=ds, processing_class=tok,
                         peft_config=peft_cfg, callbacks=[Timer()])
    # Real tokens of every sequence of every micro-batch, in the order the steps consume them.
    seq_lens: list[list[int]] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        out = collate(examples)
        seq_lens.append([int(x) for x in out["attention_mask"].sum(-1)])
        return out

    trainer.data_collator = counting_collator
    setup_s = time.perf_counter() - t_setup
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = times[args.warmup:]
    med = float(np.median(timed))
    B = tcfg.per_device_train_batch_size * tcfg.gradient_accumulation_steps
    G = tcfg.gradient_accumulation_steps
    fp = flop_params(path, lo.r, targets)
    work, work_tokens = [], []
    if fp is not None and len(seq_lens) >= G * len(times):
        for i in range(args.warmup, len(times)):
            lens = [t for mb in seq_lens[i * G:(i + 1) * G] for t in mb]
            work.append(work_flops(fp, lens))
            work_tokens.append(sum(lens))
    kind = torch.cuda.get_device_name(0) if cuda else "cpu"
    return {
        "platform": "gpu" if cuda else "cpu",
        "device_kind": kind,
        "device_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        **work_stats(work, work_tokens, med, nominal_peak(kind, args.peak_tflops)),
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
    """One side in its own process. With --only its output goes straight to ours (a log that
    survives a time limit); otherwise it is kept and shown only if the side fails."""
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "result.json"
        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--side", side, "--result", str(res),
               "--trl-device", args.trl_device]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        for s in args.set:
            cmd += ["--set", s]
        if args.profile and side == "jax":
            cmd += ["--profile", str(Path(args.profile).resolve()), "--profile-steps", str(args.profile_steps)]
        env = dict(os.environ)
        if side == "trl":
            env["JAX_PLATFORMS"] = "cpu"   # jaxpref's data loading imports jax: keep it off the GPU
        quiet = args.only is None
        proc = subprocess.run(cmd, check=False, env=env, text=True,
                              stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.STDOUT if quiet else None)
        if proc.returncode == 2:   # the side's one-line error about the flags or the config
            if quiet:
                lines = [x for x in proc.stdout.splitlines() if x.startswith("bench: error:")]
                sys.stderr.write((lines[-1] if lines else proc.stdout[-4000:]) + "\n")
            raise SystemExit(2)
        if proc.returncode != 0 or not res.exists():
            if quiet:
                sys.stderr.write(proc.stdout[-4000:])
            raise SystemExit(f"bench: the {side} side failed (exit {proc.returncode})")
        return json.loads(res.read_text())


def table(rows: list[dict]) -> str:
    head = ("| side | config | device | step s (median) | p10-p90 s | CPU s/step (user+sys) | pairs/s | ratio to TRL "
            "| model GFLOP/s | of matmul peak | MFU | compile s | peak RSS GiB | device peak GiB | load |")
    lines = [head, "|" + "---|" * 15]
    trl = next((r for r in rows if r["side"] == "trl"), None)
    f = lambda r, k, spec: spec.format(r[k]) if r.get(k) is not None else "-"
    for r in rows:
        ratio = f"{trl['step_s_median'] / r['step_s_median']:.2f}x" if trl else "-"
        frac = f"{100 * r['peak_fraction']:.0f}% of {r['matmul_peak_gflops']:.0f}" if "peak_fraction" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}% of {r['mfu_peak_tflops']:.0f} T" if r.get("mfu") is not None else "-"
        cpu = f"{r['cpu_user_s_per_step']:.2f}+{r['cpu_sys_s_per_step']:.2f}"
        lines.append(f"| {r['side']} | {r['config']} | {r.get('device_kind', '-')} | {r['step_s_median']:.3f} "
                     f"| {r['step_s_p10']:.3f}-{r['step_s_p90']:.3f} | {cpu} | {r['pairs_per_s']:.2f} | {ratio} "
                     f"| {f(r, 'model_gflops', '{:.0f}')} | {frac} | {mfu} | {f(r, 'compile_s', '{:.1f}')} "
                     f"| {r['peak_rss_gib']:.2f} | {f(r, 'device_peak_gib', '{:.2f}')} | {r['load_avg_1m']:.1f} |")
    return "\n".join(lines)


def check_args(args) -> None:
    """The flags and the config, before any side runs: a JaxprefError naming the flag or key."""
    from jaxpref.config import load_config

    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--profile-steps", args.profile_steps, 1)):
        if value < least:
            raise ConfigError(f"{flag} {value}: must be >= {least}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops {args.peak_tflops}: must be > 0")
    trl = args.vs_trl or args.only == "trl"
    if args.only == "jax" and args.vs_trl:
        raise ConfigError("--vs-trl times TRL's side, which --only jax leaves out; give one of them")
    if args.only == "trl" and args.profile:
        raise ConfigError("--profile traces the jaxpref side, which --only trl leaves out")
    if args.trl_device != "auto" and not trl:
        raise ConfigError(f"--trl-device {args.trl_device}: no TRL side runs (add --vs-trl, or --only trl)")
    cfg = load_config(args.config, list(args.set))
    if trl and cfg.post_training.method != "dpo":
        raise ConfigError(f"{args.config}: --vs-trl compares DPO only (`post_training.method` is "
                          f"{cfg.post_training.method})")
    if args.json:
        check_writable(args.json, "--json", directory=False)
    if args.profile:
        check_writable(args.profile, "--profile", directory=True)
        prof = Path(args.profile)
        theirs = [n for n in ("summary.txt", "summary.json") if (prof / n).exists()]
        if theirs and not (prof / "plugins" / "profile").is_dir():   # not an earlier trace's folder
            raise ConfigError(f"--profile {prof}: holds {theirs[0]}, which is not an earlier profile's "
                              "(it would be overwritten); name another folder")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.side is not None:
            if args.side == "jax":
                from jaxpref.runtime.no_torch import hide_torch

                hide_torch()  # as jaxpref's command lines do: torch is not part of the measured RSS
            out = run_jax(args) if args.side == "jax" else run_trl(args)
            Path(args.result).write_text(json.dumps(out))
            return 0
        check_args(args)
    except JaxprefError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    if args.only is not None:
        rows = [run_side(args, args.only)]
    else:
        rows = [run_side(args, "jax")]
        if args.vs_trl:
            if args.trl_device == "auto":  # TRL on the device jaxpref ran on
                args.trl_device = "cuda" if rows[0].get("platform") == "gpu" else "cpu"
            rows.append(run_side(args, "trl"))
    j = next((r for r in rows if r["side"] == "jaxpref"), None)
    t = next((r for r in rows if r["side"] == "trl"), None)
    if j is not None:
        print(f"jaxpref: compile {j['compile_s']} s, step median {j['step_s_median']} s "
              f"(p10 {j['step_s_p10']}, p90 {j['step_s_p90']}), {j['pairs_per_s']} pairs/s, "
              f"{j['real_tokens_per_s']} real tokens/s, padding {100 * j['padding_fraction']:.1f}%, "
              f"{j['model_gflop_per_step']} GFLOP/step = {j['model_gflops']} GFLOP/s = "
              f"{100 * j['peak_fraction']:.0f}% of the {j['matmul_peak_gflops']} GFLOP/s matmul peak, "
              f"peak RSS {j['peak_rss_gib']} GiB, "
              + (f"device peak {j['device_peak_gib']} GiB, " if j.get("device_peak_gib") is not None else "")
              + (f"MFU {100 * j['mfu']:.1f}%, " if j.get("mfu") is not None else "")
              + f"{j['compiled_shapes']} compiled shape(s), {j['device_kind']}, load {j['load_avg_1m']}")
    if t is not None:
        print(f"trl:     step median {t['step_s_median']} s (p10 {t['step_s_p10']}, p90 {t['step_s_p90']}), "
              f"{t['pairs_per_s']} pairs/s, peak RSS {t['peak_rss_gib']} GiB, "
              + (f"device peak {t['device_peak_gib']} GiB, " if t.get("device_peak_gib") is not None else "")
              + (f"MFU {100 * t['mfu']:.1f}%, " if t.get("mfu") is not None else "")
              + f"{t['device_kind']}, {t['torch_threads']} torch threads, load {t['load_avg_1m']}"
              + (f"; jaxpref is {t['step_s_median'] / j['step_s_median']:.2f}x TRL's speed" if j else ""))
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
