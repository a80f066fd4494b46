"""The sizes of an online run, by the rules its loop uses: prompts and completions per generation
(PPO: per rollout batch), generations per epoch, optimizer steps. One function for the loops
(`online_loop.OnlineRun`, `ppo_loop.PpoRun`) and `--dry-run` (`online_dryrun`), so that the plan
printed is the run's.

GRPO and RLOO (TRL's GRPOTrainer counting): a generation holds per_device_train_batch_size x
data-parallel devices x gradient_accumulation_steps completions, `num_generations` per prompt, and
is used for `num_iterations` optimizer steps. Online DPO: as many prompts, two completions each.
PPO: as many prompts, one completion each, one step (TRL's update: `num_ppo_epochs` x
`num_mini_batches` optimizer steps) per rollout batch; without `max_steps`, TRL's count of
updates: ceil(int(num_epochs x prompts) / prompts per rollout batch).
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxpref.config import Config
from jaxpref.errors import ConfigError
from jaxpref.training.online_pairs import SAMPLES as PAIR_SAMPLES

PAIRS = "online_dpo"    # two completions per prompt, ranked (`online_pairs`)


@dataclass(frozen=True)
class Sizes:
    B: int                 # rows per micro-batch (per_device_train_batch_size x data-parallel devices)
    G: int                 # micro-batches per optimizer step (gradient_accumulation_steps)
    K: int                 # completions per prompt
    per_gen: int           # prompts per generation (rollout batch)
    gens_per_epoch: int
    steps_per_gen: int     # steps one generation is used for
    total: int             # steps of the run
    unit: str              # what a generation is called in messages
    completion_key: str    # the post_training key that limits a completion's tokens
    completion_limit: int

    @property
    def generations(self) -> int:
        return -(-self.total // self.steps_per_gen)


def per_generation(cfg: Config, dp: int) -> tuple[int, int, int, int]:
    """(B, G, completions per prompt, prompts per generation) on `dp` data-parallel devices;
    one-line ConfigErrors for batch sizes the loop cannot run (checked before anything is loaded)."""
    tcfg, pt = cfg.training, cfg.post_training
    B, G = tcfg.per_device_train_batch_size * dp, tcfg.gradient_accumulation_steps
    if pt.method == "ppo":
        check_ppo_sizes(cfg, B, G)
        return B, G, 1, B * G
    if pt.method == PAIRS:
        return B, G, PAIR_SAMPLES, B * G
    K = pt.num_generations
    if (B * G) % K:
        raise ConfigError(f"{cfg.source}: a generation's {B * G} completions (per_device_train_batch_size x "
                          f"devices x gradient_accumulation_steps) are not a multiple of "
                          f"`post_training.num_generations` {K}")
    return B, G, K, B * G // K


def plan(cfg: Config, dp: int, prompts: int) -> Sizes:
    """The sizes for `prompts` usable prompts on `dp` data-parallel devices; one-line
    ConfigErrors for sizes the loop cannot run."""
    pt = cfg.post_training
    B, G, K, per_gen = per_generation(cfg, dp)
    ppo = pt.method == "ppo"
    unit = "rollout batch" if ppo else "generation"
    key = "response_length" if ppo else "max_new_tokens" if pt.method == PAIRS else "max_completion_length"
    steps_per_gen = 1 if ppo else pt.num_iterations
    gens_per_epoch = prompts // per_gen
    if gens_per_epoch == 0:
        raise ConfigError(f"{cfg.source}: {prompts} usable prompts are fewer than one {unit}'s {per_gen} prompts")
    tr = cfg.training
    if ppo and tr.max_steps <= 0:
        # TRL's PPOTrainer counts episodes: int(num_train_epochs x prompts) of them, in rollout
        # batches rounded up (its dataloader cycles; each pass drops its last partial batch).
        total = -(-int(tr.num_epochs * prompts) // per_gen)
        if total == 0:
            raise ConfigError(f"{cfg.source}: `training.num_epochs` {tr.num_epochs:g} x {prompts} prompts is not "
                              f"one episode: ppo would train no rollout batch")
    else:
        total = tr.total_steps(gens_per_epoch * steps_per_gen)
    return Sizes(B, G, K, per_gen, gens_per_epoch, steps_per_gen, total, unit, key, getattr(pt, key))


def check_ppo_sizes(cfg: Config, B: int, G: int) -> None:
    """TRL's PPO batch-size rules, as one-line ConfigErrors."""
    pt = cfg.post_training
    if G % pt.num_mini_batches:
        raise ConfigError(f"{cfg.source}: `training.gradient_accumulation_steps` {G} is not a multiple of "
                          f"`post_training.num_mini_batches` {pt.num_mini_batches} (a mini-batch is whole "
                          "micro-batches)")
    if pt.whiten_rewards and B * G // pt.num_mini_batches < 8:
        raise ConfigError(f"{cfg.source}: `post_training.whiten_rewards` needs mini-batches of at least 8 "
                          f"completions, got {B * G // pt.num_mini_batches} (per_device_train_batch_size x "
                          "devices x gradient_accumulation_steps / num_mini_batches)")


def step_key(cfg: Config, sizes, longest: int) -> tuple:
    """The training step's largest micro-batch shape [accum, rows, tokens, completion slots]: B
    rows of the longest prompt (bucketed as the rollout pads it) and the completion limit's slots."""
    from jaxpref.generation.engine import bucket

    pt, C = cfg.post_training, sizes.completion_limit
    accum = sizes.G // pt.num_mini_batches if pt.method == "ppo" else sizes.G
    return accum, sizes.B, bucket(longest) + C, C
