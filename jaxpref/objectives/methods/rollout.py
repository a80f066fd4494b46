"""What the online methods (`grpo`, `rloo`, `online_dpo`, `ppo`) share: the sampling and reward
keys, and the config checks. TRL's names and defaults; a key whose TRL default differs between
trainers is None here and set by each method's `Method.defaults`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jaxpref.errors import ConfigError


@dataclass
class RolloutKeys:
    # `package.module:function` or `path/to/file.py:function` (relative to the config's folder),
    # called as TRL calls reward functions; any other entry names a reward model checkpoint.
    reward_funcs: str | list[str] | None = None
    reward_weights: list[float] | None = None     # one per reward function; default 1.0 each
    temperature: float | None = None              # sampling; None: the method's TRL default
    top_p: float = 1.0                            # nucleus sampling: the smallest set of tokens with this mass
    top_k: int = 0                                # 0: no top-k filter


@dataclass
class SamplingKeys(RolloutKeys):
    """The sampling keys GRPO's, RLOO's and online DPO's TRL configs add (PPO's does not)."""
    min_p: float | None = None                    # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0               # > 1: tokens already in the prompt or completion less likely


@dataclass
class GroupKeys(SamplingKeys):
    """GRPO's and RLOO's: G completions per prompt, a clipped ratio, reuse of a rollout."""
    num_generations: int | None = None            # G; None: 8 (GRPO), 2 (RLOO)
    max_completion_length: int = 512              # tokens sampled per completion at most
    num_iterations: int = 1                       # optimizer steps per rollout batch (TRL's mu)
    epsilon: float = 0.2                          # ratio clip, lower side
    epsilon_high: float | None = None             # upper side (DAPO: 0.28); None: epsilon
    mask_truncated_completions: bool = False      # completions without EOS leave the loss


def reward_entries(pt) -> list[str]:
    funcs = pt.reward_funcs
    return [funcs] if isinstance(funcs, str) else list(funcs or [])


def _unused(pt, method: str, src: str) -> None:
    """Offline keys an online method would silently ignore."""
    for key, off in (("label_smoothing", 0.0), ("reference_free", False), ("precompute_ref_logps", False),
                     ("loss_weights", None), ("use_weighting", False)):
        if getattr(pt, key, off) != off:
            raise ConfigError(f"{src}: `post_training.{key}` does not apply to the online method {method}")


def check_rollout(pt, loss_types: tuple[str, ...], src: str, method: str) -> None:
    """The checks every online method shares: one loss type, reward functions present and
    well-formed (a `file.py` must exist), weights one per function, sampling values in range."""
    from jaxpref.data.rewards import check_entries

    _unused(pt, method, src)
    if len(loss_types) != 1:
        raise ConfigError(f"{src}: `post_training.loss_type` takes one value for {method}, got {list(loss_types)}")
    entries = reward_entries(pt)
    if not entries:
        raise ConfigError(f"{src}: {method} needs `post_training.reward_funcs` (e.g. `rewards.py:correct`, "
                          "a function in a file next to the config)")
    check_entries(entries, Path(src).parent, src)
    if pt.reward_weights is not None and len(pt.reward_weights) != len(entries):
        raise ConfigError(f"{src}: `post_training.reward_weights` has {len(pt.reward_weights)} entries for "
                          f"{len(entries)} reward function(s)")
    if pt.temperature is not None and pt.temperature <= 0:
        raise ConfigError(f"{src}: `post_training.temperature` must be > 0, got {pt.temperature}")
    if not 0 < pt.top_p <= 1:
        raise ConfigError(f"{src}: `post_training.top_p` must be in (0, 1], got {pt.top_p}")
    if pt.top_k < 0:
        raise ConfigError(f"{src}: `post_training.top_k` must be >= 0 (0: no top-k), got {pt.top_k}")
    if pt.min_p is not None and not 0 <= pt.min_p <= 1:
        raise ConfigError(f"{src}: `post_training.min_p` must be in [0, 1], got {pt.min_p}")
    if pt.repetition_penalty <= 0:
        raise ConfigError(f"{src}: `post_training.repetition_penalty` must be > 0 (1: off), "
                          f"got {pt.repetition_penalty}")


def check_group(pt, src: str, method: str) -> None:
    """GRPO's and RLOO's own ranges."""
    if pt.num_generations is not None and pt.num_generations < 2:
        raise ConfigError(f"{src}: `post_training.num_generations` must be >= 2 ({method} compares the "
                          f"completions of a prompt), got {pt.num_generations}")
    for key in ("max_completion_length", "num_iterations"):
        if getattr(pt, key) < 1:
            raise ConfigError(f"{src}: `post_training.{key}` must be >= 1, got {getattr(pt, key)}")
    if pt.epsilon < 0 or (pt.epsilon_high is not None and pt.epsilon_high < 0):
        raise ConfigError(f"{src}: `post_training.epsilon` and `epsilon_high` must be >= 0")
    if pt.beta is not None and pt.beta < 0:
        raise ConfigError(f"{src}: `post_training.beta` must be >= 0 (0: no reference pass), got {pt.beta}")


# What a GRPO / RLOO rollout batch logs (TRL's names), besides `rewards/<function>/mean|std`.
ROLLOUT_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                   "completions/min_length", "completions/max_length", "completions/clipped_ratio",
                   "completions/mean_terminated_length", "completions/min_terminated_length",
                   "completions/max_terminated_length")
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean", "clip_ratio/high_max",
                "clip_ratio/region_mean")


def scalars(*dicts) -> dict:
    """Metric dicts of [1] arrays -> one dict of scalars."""
    return {k: v.reshape(()) for d in dicts for k, v in d.items()}
