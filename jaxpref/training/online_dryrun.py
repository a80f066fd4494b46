"""`--dry-run` of an online method (GRPO, RLOO): the model, the prompts, the reward functions and
the plan of the run (prompts and completions per generation, generations, optimizer steps,
checkpoints, the training step's memory plan) without reading weight values, generating or
training. The sizes are those `online_loop.OnlineRun` uses."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from jaxpref.config import Config
from jaxpref.errors import ConfigError, JaxprefError


def plan(cfg: Config, dp: int, prompts: int) -> dict:
    """The run's sizes for `prompts` usable prompts on `dp` data-parallel devices (the online
    loop's rules); ConfigError as the loop raises it."""
    tcfg, pt = cfg.training, cfg.post_training
    B, G, K = tcfg.per_device_train_batch_size * dp, tcfg.gradient_accumulation_steps, pt.num_generations
    if (B * G) % K:
        raise ConfigError(f"{cfg.source}: a generation's {B * G} completions (per_device_train_batch_size x "
                          f"devices x gradient_accumulation_steps) are not a multiple of "
                          f"`post_training.num_generations` {K}")
    per_gen = B * G // K
    gens_per_epoch = prompts // per_gen
    if gens_per_epoch == 0:
        raise ConfigError(f"{cfg.source}: {prompts} usable prompts are fewer than one generation's {per_gen} prompts")
    total = tcfg.total_steps(gens_per_epoch * pt.num_iterations)
    return {"B": B, "G": G, "K": K, "per_gen": per_gen, "gens_per_epoch": gens_per_epoch, "total": total,
            "generations": -(-total // pt.num_iterations)}


def check_online_model(cfg: Config, index: int) -> list[str]:
    from jaxpref.data.load import load_rows
    from jaxpref.data.prompts import prepare_prompts
    from jaxpref.data.rewards import load_reward_func
    from jaxpref.objectives.methods import get_method
    from jaxpref.objectives.methods.rollout import reward_entries
    from jaxpref.runtime import mesh as mesh_mod
    from jaxpref.training.dryrun import check_weights_and_lora
    from jaxpref.training.online_loop import check_online

    entry = cfg.models[index]
    t0 = time.time()
    print(f"== model {index}: {entry.name} ({entry.huggingface_id})")
    pt, tcfg = cfg.post_training, cfg.training
    try:
        check_online(cfg)
        bundle, tok, spec, abstract, mesh, total, trainable = check_weights_and_lora(cfg, index)
        funcs = [load_reward_func(e, Path(cfg.source).parent) for e in reward_entries(pt)]
        data = prepare_prompts(load_rows(cfg.dataset), cfg.dataset, tok, tcfg.max_prompt_length,
                               rule=get_method(pt.method).tokenization)
        sizes = plan(cfg, mesh_mod.data_parallel_size(mesh), len(data))
    except JaxprefError as e:
        return [f"model `{entry.name}`: {e}"]
    print(f"  rewards          {', '.join(f.name for f in funcs)}"
          + (f" (weights {', '.join(f'{w:g}' for w in pt.reward_weights)})" if pt.reward_weights else ""))
    skipped = data.skipped
    print(f"  prompts          format {data.format}, {data.rows_in} rows in, {len(data)} usable, "
          f"{sum(skipped.values())} skipped" + (f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else "")
          + f", {data.truncated} truncated (max_prompt_length {tcfg.max_prompt_length})")
    lens = np.array([len(p) for p in data.prompt_ids])
    print(f"  prompt tokens    p50 {int(np.percentile(lens, 50))}, p95 {int(np.percentile(lens, 95))}, max {int(lens.max())}")
    s = sizes
    print(f"  generation       {s['per_gen']} prompts x {s['K']} completions = {s['B'] * s['G']} completions "
          f"(max_completion_length {pt.max_completion_length}, temperature {pt.temperature:g}), each used for "
          f"{pt.num_iterations} step(s) of {s['G']} micro-batch(es) of {s['B']}")
    print(f"  schedule         {s['gens_per_epoch']} generations/epoch, {s['generations']} generations, "
          f"{s['total']} steps, {len(data) - s['gens_per_epoch'] * s['per_gen']} prompts/epoch left over")
    every, keep = cfg.save_steps, cfg.finetuning.save_total_limit
    saves = (f"at the first generation boundary after every {every} steps and at the end"
             + (f", newest {keep} kept" if keep else "")) if every else \
        "none (finetuning.save_steps unset): --resume cannot continue this run"
    print(f"  checkpoints      {saves}")
    _memory(cfg, bundle, mesh, total, trainable if spec else 0, int(lens.max()), sizes)
    print(f"  checked in {time.time() - t0:.1f} s")
    return []


def _memory(cfg: Config, bundle, mesh, total: int, trainable: int, longest: int, sizes: dict) -> None:
    """The training step's memory plan for its largest micro-batch: B rows of the longest prompt
    (bucketed as the rollout pads it) and max_completion_length completion slots."""
    from jaxpref.generation.engine import bucket
    from jaxpref.runtime.memory import format_bytes, memory_plan

    C = cfg.post_training.max_completion_length
    key = (sizes["G"], sizes["B"], bucket(longest) + C, C)
    mem = memory_plan(cfg, bundle.args, total, trainable, [key], mesh=mesh)
    print(f"  mesh             {dict(mesh.shape)} over {mesh.devices.size} device(s); per device:")
    print(f"  memory plan      training step [accum, rows, tokens, completion slots] {list(key)}: "
          + ", ".join(f"{k} {format_bytes(v)}" for k, v in mem.items() if v)
          + " (the generation's KV cache is not in it)")
