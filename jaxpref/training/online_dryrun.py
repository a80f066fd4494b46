"""`--dry-run` of an online method (GRPO, RLOO, online DPO, PPO): the model, the prompts, the reward
functions and the plan of the run (prompts and completions per generation, generations, optimizer
steps, checkpoints, the training step's memory plan; PPO: the rollout batch, its num_ppo_epochs x
num_mini_batches update and the value head) without reading weight values, generating or training.
The sizes are those the loops use (`online_plan`)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from jaxpref.config import Config
from jaxpref.errors import JaxprefError


def check_online_model(cfg: Config, index: int, resume=None) -> list[str]:
    from jaxpref.data.load import load_rows
    from jaxpref.data.prompts import prepare_prompts
    from jaxpref.data.rewards import load_reward_func
    from jaxpref.objectives.methods import get_method
    from jaxpref.objectives.methods.rollout import reward_entries
    from jaxpref.runtime import mesh as mesh_mod
    from jaxpref.training import setup
    from jaxpref.training.dryrun import check_weights_and_lora
    from jaxpref.training.online_loop import check_online
    from jaxpref.training.online_plan import plan, step_key
    from jaxpref.training.ppo_loop import stop_token

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
        if pt.method == "ppo":
            stop_token(cfg, tok)
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
    _plan_lines(cfg, sizes, len(data), bundle.args.hidden_size)
    extra = bundle.args.hidden_size if pt.method == "ppo" else 0   # the value head
    bundle = setup.resolve_recompute(cfg, bundle, abstract, spec, [step_key(cfg, sizes, int(lens.max()))], mesh)
    _memory(cfg, bundle, mesh, total + extra, (trainable if spec else 0) + extra, int(lens.max()), sizes)
    problems = []
    if resume is not None:
        from jaxpref.models.source import fingerprint
        from jaxpref.training.dryrun_resume import resume_problems
        from jaxpref.training.online_resume import fingerprint as run_fingerprint
        problems = resume_problems(cfg, index, lambda: run_fingerprint(cfg, entry, fingerprint(bundle.source),
                                                                   mesh_mod.data_parallel_size(mesh)),
                                   resume, sizes.total)
    print(f"  checked in {time.time() - t0:.1f} s")
    return problems


def _plan_lines(cfg: Config, s, prompts: int, hidden: int) -> None:
    """The generation (PPO: rollout batch and update), schedule and checkpoint lines."""
    pt = cfg.post_training
    limit = f"{s.completion_key} {s.completion_limit}, temperature {pt.temperature:g}"
    if pt.method == "ppo":
        stop = (f"stop_token_id {pt.stop_token_id}" if pt.stop_token_id is not None else "stop_token eos"
                if pt.stop_token == "eos" else "no stop token: each runs to response_length")
        print(f"  rollout batch    {s.per_gen} prompts x 1 completion ({limit}, {stop})")
        mini = s.G // pt.num_mini_batches
        print(f"  update           num_ppo_epochs {pt.num_ppo_epochs} x num_mini_batches {pt.num_mini_batches} = "
              f"{pt.num_ppo_epochs * pt.num_mini_batches} optimizer steps per rollout batch, each of {mini} "
              f"micro-batch(es) of {s.B}")
        print(f"  value head       linear [hidden {hidden} -> 1] on the last hidden state, from zeros, trained "
              "with the adapter; saved as value_head.safetensors")
    else:
        print(f"  generation       {s.per_gen} prompts x {s.K} completions = {s.per_gen * s.K} completions "
              f"({limit}), each used for {pt.num_iterations} step(s) of {s.G} micro-batch(es) of {s.B}")
    units = s.unit + ("es" if s.unit.endswith("h") else "s")
    print(f"  schedule         {s.gens_per_epoch} {units}/epoch, {s.generations} {units}, {s.total} steps, "
          f"{prompts - s.gens_per_epoch * s.per_gen} prompts/epoch left over")
    every, keep = cfg.save_steps, cfg.finetuning.save_total_limit
    where = f"every {every} steps" if s.steps_per_gen == 1 else f"at the first {s.unit} boundary after every {every} steps"
    saves = (f"{where} and at the end"
             + (f", newest {keep} kept" if keep else "")) if every else \
        "none (finetuning.save_steps unset): --resume cannot continue this run"
    print(f"  checkpoints      {saves}")


def _memory(cfg: Config, bundle, mesh, total: int, trainable: int, longest: int, sizes) -> None:
    """The training step's memory plan for its largest micro-batch: B rows of the longest prompt
    (bucketed as the rollout pads it) and the completion limit's slots; an optimizer step runs G
    micro-batches (PPO: a mini-batch's G / num_mini_batches)."""
    from jaxpref.runtime.memory import format_bytes, memory_plan
    from jaxpref.training.online_plan import step_key

    key = step_key(cfg, sizes, longest)
    from jaxpref.lora.tree import count
    from jaxpref.runtime.mesh import per_device_elements
    abstract = bundle.abstract_params()   # `total` beyond it: PPO's value head, replicated
    base = per_device_elements(abstract, mesh, bundle.arch.roles) + total - count(abstract)
    mem = memory_plan(cfg, bundle.args, total, trainable, [key], mesh=mesh, base_per_device=base)
    from jaxpref.training.dryrun import attention_line
    print(f"  attention        training step {attention_line(cfg, bundle.args, [key], mesh)}; the generation "
          "attends through its KV cache")
    from jaxpref.training.dryrun import mesh_line
    print(f"  mesh             {mesh_line(cfg, mesh)}; per device:")
    print(f"  memory plan      training step [accum, rows, tokens, completion slots] {list(key)}: "
          + ", ".join(f"{k} {format_bytes(v)}" for k, v in mem.items() if v)
          + " (the generation's KV cache is not in it)")
