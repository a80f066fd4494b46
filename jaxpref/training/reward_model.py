"""Reward models: a sequence-classification checkpoint (transformers' `*ForSequenceClassification`
with one label) read into our decoder plus its `score` head, frozen, scoring completions as TRL's
GRPO/RLOO trainers do (`GRPOTrainer._calculate_rewards`).

TRL loads the entry with `AutoModelForSequenceClassification.from_pretrained(entry, num_labels=1)`
and its own tokenizer (the pad token set to EOS when it has none); it joins each prompt and
completion (conversational prompts: the messages plus the completion's, through the reward
model's chat template), tokenises them without special tokens, right-padded, and takes
`logits[:, 0]`. The logit is the `score` head [num_labels, hidden] (no bias) applied to the final
hidden state of the last token whose id is not the pad id, as transformers pools.

Scoring runs jitted in float32 (TRL: the checkpoint's dtype, unless `model_init_kwargs` sets
one), in batches of a fixed number of rows, lengths rounded up to a power of two (a handful of
compiled shapes); with several local devices the rows are split over them and the weights
replicated. The entry is a folder (relative to the config's folder, or
absolute); its metric name is the folder's name, the entry's last path part as TRL takes it
(`rewards/<model name>/mean`; a trailing `/` is dropped first, where TRL's name would be empty).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from jaxpref.errors import ConfigError, JaxprefError, ModelSourceError

BATCH_ROWS = 32   # rows per compiled call (per device)


class RewardModelError(JaxprefError):
    """A reward model cannot score a batch (e.g. conversational prompts without a chat template)."""


def model_name(entry: str) -> str:
    """TRL's name for a reward model loaded from `entry`: the last part of its path."""
    return entry.rstrip("/").split("/")[-1]


def folder(entry: str, config_dir: Path) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else config_dir / path


def _checked_score(src, entry: str) -> np.ndarray:
    """The `score` head [1, hidden] of a one-label sequence-classification checkpoint, or a
    one-line ConfigError naming what the folder is instead."""
    from jaxpref.models.weights import read_tensor

    hf = src.hf_config
    archs = [a for a in hf.get("architectures") or [] if isinstance(a, str)]
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"reward model `{entry}`: not a sequence-classification checkpoint (config.json "
                          f"architectures: {', '.join(archs)}); a reward model is saved from an "
                          "AutoModelForSequenceClassification with num_labels=1")
    labels = hf.get("id2label")
    if isinstance(labels, dict) and len(labels) != 1:
        raise ConfigError(f"reward model `{entry}`: config.json has num_labels {len(labels)} (id2label); "
                          "a reward model has num_labels=1 (one score per sequence)")
    score = read_tensor(src, "score.weight")
    if score is None:
        raise ConfigError(f"reward model `{entry}`: not a sequence-classification checkpoint (its safetensors "
                          "weights have no `score.weight`)")
    if score.ndim != 2 or score.shape[0] != 1:
        labels = f"num_labels {score.shape[0]}, " if score.ndim == 2 else ""
        raise ConfigError(f"reward model `{entry}`: `score.weight` has shape {tuple(score.shape)} ({labels}not "
                          "[1, hidden_size]); a reward model has num_labels=1 (one score per sequence)")
    return np.asarray(score, np.float32)


def _bundle(src):
    """Our decoder for the checkpoint's body: no LM head (the tree ties it to the embedding, which
    the checkpoint has), `score.weight` left to `_checked_score`."""
    from jaxpref.models import weights

    body = dataclasses.replace(src, hf_config=dict(src.hf_config, tie_word_embeddings=True))
    bundle = weights.build(body, "float32", "float32")
    arch = dataclasses.replace(bundle.arch, ignored=bundle.arch.ignored + (re.escape("score.weight"),))
    return weights.ModelBundle(body, arch, bundle.args, bundle.module)


def load_reward_model(entry: str, config_dir: Path) -> "RewardModel":
    """A `post_training.reward_funcs` entry naming a reward model folder -> its scorer, or a
    one-line ConfigError (no folder, not a one-label sequence-classification checkpoint,
    unsupported architecture, missing tensors)."""
    from jaxpref.models.source import load_tokenizer, resolve
    from jaxpref.models.weights import load_params

    path = folder(entry, config_dir)
    if not path.is_dir():
        raise ConfigError(f"reward model `{entry}`: folder {path} not found (a reward function is written "
                          "`path/to/file.py:function` or `package.module:function`)")
    try:
        src = resolve(str(path))
        score = _checked_score(src, entry)
        bundle = _bundle(src)
        params = load_params(bundle)
        tok = load_tokenizer(src)
    except ModelSourceError as e:
        raise ConfigError(f"reward model `{entry}`: {e}") from None
    if score.shape[1] != bundle.args.hidden_size:
        raise ConfigError(f"reward model `{entry}`: `score.weight` has shape {tuple(score.shape)}, expected "
                          f"[1, {bundle.args.hidden_size}] (hidden_size)")
    model = RewardModel(model_name(entry), entry, bundle, params, score, tok)
    model.max_tokens = src.hf_config.get("n_positions")   # learned positions (GPT-2): a hard limit
    return model


class RewardModel:
    """A frozen reward model called like a reward function: (prompts, completions, ...) -> one
    float per completion."""

    def __init__(self, name: str, entry: str, bundle, params, score: np.ndarray, tok):
        import jax

        self.__name__, self.entry, self.tok = name, entry, tok
        self.pad_id = int(tok.pad_token_id)
        devices = jax.local_devices() if jax.process_count() == 1 else jax.local_devices()[:1]
        self.mesh = jax.sharding.Mesh(np.array(devices), ("rows",))
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.rows_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("rows"))
        self.params = jax.device_put((params, score), rep)
        self.rows = BATCH_ROWS * len(devices)
        self.max_tokens: int | None = None
        self._forward = jax.jit(_make_forward(bundle, self.pad_id))
        self._forward_at = jax.jit(_make_forward(bundle, self.pad_id, at_last=True))

    def texts(self, prompts: list, completions: list) -> list[str]:
        """TRL's reward-model input text: prompt + completion, or the chat template's rendering of
        the prompt messages followed by the completion's."""
        if prompts and isinstance(prompts[0], list):
            if not getattr(self.tok, "chat_template", None):
                raise RewardModelError(f"reward model `{self.entry}`: conversational prompts need a chat "
                                       "template, and its tokenizer has none")
            return [self.tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        texts = self.texts(prompts, completions)
        ids = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        return self.score_ids(ids).tolist()

    def score_ids(self, seqs: list[list[int]], mask_id: int | None = None) -> np.ndarray:
        """Token id lists -> [N] float32 scores, in fixed batches of rows. `mask_id` (TRL's
        PPOTrainer, `get_reward`): every token of that id is out of attention, the positions count
        the others, and the score is the sequence's last token's."""
        import jax

        from jaxpref.generation.engine import bucket

        n = len(seqs)
        if n == 0:
            return np.zeros(0, np.float32)
        longest = max(len(s) for s in seqs)
        if self.max_tokens and longest > self.max_tokens:
            raise RewardModelError(f"reward model `{self.entry}`: a prompt and completion of {longest} tokens is "
                                   f"longer than its {self.max_tokens} positions (n_positions)")
        T = bucket(longest)
        ndev = self.mesh.size
        rows = min(self.rows, -(-n // ndev) * ndev)
        out = []
        for start in range(0, n, rows):
            ids = np.full((rows, T), self.pad_id if mask_id is None else mask_id, np.int32)
            valid = np.zeros((rows, T), np.int32)
            last = np.zeros(rows, np.int32)
            for r, s in enumerate(seqs[start:start + rows]):
                ids[r, :len(s)] = s
                valid[r, :len(s)] = 1
                last[r] = max(len(s) - 1, 0)
            if mask_id is None:
                ids, valid = jax.device_put((ids, valid), self.rows_sharding)
                out.append(np.asarray(self._forward(self.params, ids, valid)))
            else:
                valid = valid * (ids != mask_id)
                ids, valid, last = jax.device_put((ids, valid, last), self.rows_sharding)
                out.append(np.asarray(self._forward_at(self.params, ids, valid, last)))
        return np.concatenate(out)[:n]


def _make_forward(bundle, pad_id: int, at_last: bool = False):
    """(params, score), ids [B, T] right-padded, valid [B, T] -> [B] float32: the score of the
    final hidden state at the last position whose id is not `pad_id` (position 0 when none).
    `at_last`: the forward takes a fourth argument, last [B], the position to read instead."""
    import jax.numpy as jnp

    from jaxpref.models.attention import MaskInfo
    from jaxpref.models.layers import matmul

    a = bundle.args

    def forward(weights, ids, valid, last=None):
        params, score = weights
        pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        hidden = bundle.hidden(params, None, ids, pos, MaskInfo.rows(valid, pos))
        if last is None:
            index = jnp.arange(ids.shape[1], dtype=jnp.int32)
            last = jnp.argmax(index * (ids != pad_id), axis=-1)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return matmul("bd,ld->bl", h, score, a.dtype, jnp.float32, a.matmul_precision)[:, 0]

    return forward if at_last else (lambda weights, ids, valid: forward(weights, ids, valid))
