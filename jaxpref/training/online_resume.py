"""Checkpoints and --resume of an online run (GRPO, RLOO, online DPO, PPO), exact as the offline
loop's.

Design: a checkpoint is taken only at a generation boundary, after the last of a rollout's
`num_iterations` optimizer steps and before the next rollout is sampled, so no rollout is stored
(PPO: after a rollout batch's update). It holds the train state (the trainable tree: LoRA, and
PPO's value head; the optimizer state of all of it; step; dropout RNG) and a JSON record: the step,
the number of generations done (the data position: the prompt order is a function of the seed and
the epoch, the sampling seed a function of the step), the run's counters (`COUNTERS`: num_tokens;
PPO's episode), the metrics gathered since the last log (the logged row averages them) and the
fingerprint of the settings a resumed run must keep.

`finetuning.save_steps` N: a checkpoint at the first generation boundary at or after each multiple
of N (with `num_iterations` 1, every N steps), and one at the end. A final step inside a generation
(`max_steps` not a multiple of `num_iterations`) is saved too, marked as such: resuming from it goes
to the finishing work (adapter, summary), never on to more steps.

Resuming drops the metrics.jsonl rows after the checkpoint's step and the samples.jsonl rows of the
generations sampled after it (each file replaced whole: a kill then loses no row); the continued
run writes them again, identically.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from jaxpref.training import checkpoint as ckpt


def fingerprint(cfg, entry, model_fp: str, data_parallel: int | None = None) -> dict:
    """The offline loop's critical settings plus every `post_training` key (the rollouts, rewards
    and advantages depend on them all) and the content of each reward function file."""
    from jaxpref.objectives.methods.rollout import reward_entries
    from jaxpref.training import setup

    fp = setup.critical_fingerprint(cfg, entry, model_fp, "online", data_parallel=data_parallel)
    for k, v in dataclasses.asdict(cfg.post_training).items():
        fp[f"post_training.{k}"] = v
    fp["max_prompt_length"] = cfg.training.max_prompt_length
    for e in reward_entries(cfg.post_training):
        digest = _file_digest(e, Path(cfg.source).parent)
        if digest is not None:
            fp[f"reward function file {e.rpartition(':')[0]}"] = digest
    return json.loads(json.dumps(fp, default=str))   # as the JSON record will read it back


def _file_digest(entry: str, config_dir: Path) -> str | None:
    """sha256 of a `file.py:function` entry's file (None for a module or a missing file)."""
    import hashlib

    from jaxpref.data.rewards import parse_entry, resolve_file

    kind, where, _ = parse_entry(entry)
    path = resolve_file(where, config_dir) if kind == "file" else None
    if path is None or not path.is_file():
        return None
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def due(save_steps: int | None, before: int, after: int) -> bool:
    """Whether a generation that took the run from step `before` to `after` passed a multiple of
    `save_steps`."""
    return bool(save_steps) and after // save_steps > before // save_steps


def save(run, step: int, boundary: bool = True) -> None:
    """Checkpoint `run` (an OnlineRun) at `step`."""
    meta = {"fingerprint": run.fingerprint, "step": step, "generation": run.generation,
            "boundary": boundary, "window": run.window.state(),
            **{k: getattr(run, k) for k in run.COUNTERS}}
    run.store.save(step, run.state, meta)


def restore(run, force: bool, step: int | None, finished: bool) -> None:
    """The newest whole checkpoint (or `step`'s) into `run`: state, data position and the metrics
    window. Continuing from an earlier step sets the later checkpoints aside."""
    def inside_a_generation(found) -> str | None:
        if not found[2].get("boundary", True) and found[0] < run.total:
            return (f"checkpoint {found[0]} was taken inside a generation (the run's last step, "
                    f"post_training.num_iterations {run.cfg.post_training.num_iterations}), so it cannot be "
                    "continued to more steps; --resume-from an earlier step")
        return None

    found = ckpt.resume_point(run, force, step, finished, refuse=inside_a_generation)
    if found is None:
        return
    run.start, run.state, meta = found
    run.generation = int(meta["generation"])
    for k in run.COUNTERS:
        setattr(run, k, int(meta.get(k, 0)))
    run.window.restore(meta.get("window", []))
    ckpt.set_aside_later(run, step)
    more = f" to {run.total} steps" if finished and run.start < run.total else ""
    print(f"[{run.entry.name}] resuming from step {run.start}{more}", file=sys.stderr)


def truncate_samples(path: Path, step: int) -> None:
    """Drop samples.jsonl rows of the generations sampled at `step` or later (a rollout's rows carry
    the step it was sampled at); replaced whole, as `checkpoint.truncate_metrics` does."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            at = int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue  # a row cut by a kill
        if at < step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def same_length(cfg, run_dir: Path) -> bool:
    """Whether a finished run was asked for as many steps as now (its config.yaml's
    `training.max_steps` and `num_epochs`): then --resume has nothing to do. The two keys are read
    alone (the saved config's relative reward-function paths do not resolve from the run folder)."""
    import yaml

    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))["training"]
        return (saved["max_steps"], saved["num_epochs"]) == (cfg.training.max_steps, cfg.training.num_epochs)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return False
