"""`python -m jaxpref.evaluate --config FILE | --run DIR --output FILE.jsonl` (or `jaxpref evaluate`):
per-example preference log-probs.

For every pair of a split (the same tokens, truncation and layout that training uses) it writes
one JSON line: `index` (the row in the dataset split), `logps/chosen`, `logps/rejected` (policy,
summed over completion tokens), `ref_logps/chosen`, `ref_logps/rejected`, `rewards/chosen`,
`rewards/rejected` (beta * (policy - reference)); then prints a summary with TRL's metric names
and values (`trainer.evaluate()`'s: the mean of each eval batch's mean).

The policy is the base model, or base + `--adapter` (a PEFT LoRA folder, e.g. a run's
`adapter/`). The reference is the base model with the adapter off, or the separate reference
model when `post_training.use_ref_model` is set, or for a config continuing `lora.init_from`'s
adapter the base with that adapter (its training's reference, as TRL's); `reference_free`
makes it 0. ORPO, CPO and SimPO have no reference (0) and their rewards are beta times the policy's
log-probs, length-averaged for ORPO and for the ipo / simpo losses (`logps/*` then are those
averages), as TRL's ORPOTrainer and CPOTrainer compute them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from jaxpref.errors import ConfigError, JaxprefError, check_writable
from jaxpref.runtime.env import load_dotenv
from jaxpref.runtime.outdir import refuse_protected


def parse_args(argv, prog: str = "python -m jaxpref.evaluate"):
    ap = argparse.ArgumentParser(prog=prog,
                                 description="Per-example policy/reference log-probs and DPO rewards on a preference split.")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="YAML config file (model, dataset, lengths, beta)")
    which.add_argument("--run", help="a run folder: its config.yaml, and its adapter/ unless --adapter")
    ap.add_argument("--model-index", type=int, default=0, help="evaluate models[I] (default 0)")
    ap.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder (or a run folder holding adapter/)")
    ap.add_argument("--split", choices=("train", "eval"), default=None,
                    help="which split of the config's data: eval (dataset.eval_split or eval_fraction) "
                         "or train (default: eval when the config has one, else train)")
    ap.add_argument("--max-examples", type=int, default=None, help="only the first N pairs of the split")
    ap.add_argument("--output", required=True, type=os.path.expanduser, help="JSON lines file to write, one line per pair")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value by dotted path, e.g. training.max_length=512")
    return ap.parse_args(argv)


def full_finetune_policy(cfg, run: Path, index: int) -> None:
    """A run folder without adapter/: a full fine-tune's model/ is the policy and the config's
    model (or its `ref_model_id`) the reference, as in its training; a run that wrote neither is
    refused (its base model is not the run's result)."""
    if not (run / "model" / "config.json").is_file():
        raise ConfigError(f"--run {run}: no adapter/ nor model/ (the run has not finished); evaluate the base "
                          "model with --config, or give --adapter")
    entry = cfg.models[index]
    entry.ref_model_id, entry.huggingface_id = entry.ref_model_id or entry.huggingface_id, str(run / "model")
    cfg.post_training.use_ref_model = True


def adapter_dir(path: str) -> Path:
    """A PEFT adapter folder; a run folder is accepted for its `adapter/`."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if not p.is_dir():
        raise ConfigError(f"--adapter {path}: " + ("is a file, expected an adapter folder" if p.exists()
                                                   else "no such directory"))
    return p


def load_adapter_for(path: Path, bundle, abstract, entry):
    """The adapter, checked against the model: its tensors must fit this model's shapes (an
    error naming the base model it was made for when not); a base model of another name that
    fits is evaluated with a warning."""
    from jaxpref.lora.card import base_model_name
    from jaxpref.lora.peft import load_adapter, read_adapter_config

    made_for = read_adapter_config(path).get("base_model_name_or_path")
    try:
        lora, spec = load_adapter(path, bundle, abstract)
    except ConfigError as e:
        raise ConfigError(f"{e} (the adapter was made for {made_for or 'an unnamed base model'}; this "
                          f"config's model is {entry.huggingface_id})") from None
    ours = {entry.huggingface_id, base_model_name(bundle.source), str(bundle.source.path)}
    if made_for and made_for not in ours and _norm(made_for) not in {_norm(x) for x in ours}:
        print(f"jaxpref.evaluate: warning: adapter {path} was made for {made_for}, not for "
              f"{entry.huggingface_id}; its shapes fit, evaluating it on this model", file=sys.stderr)
    return lora, spec


def _norm(p: str) -> str:
    import os
    return os.path.realpath(os.path.expanduser(p)) if os.path.exists(os.path.expanduser(p)) else p


def batches(data, batch_size: int, layout):
    """(positions in `data`, micro-batch [N, ...]) over every pair in order; the last batch is
    filled up with repeats of its last pair, whose results are dropped."""
    from jaxpref.data.iterator import BatchIterator

    it = BatchIterator(data, batch_size, 1, 0, layout, shuffle=False)
    n = len(data)
    for start in range(0, n, batch_size):
        real = np.arange(start, min(start + batch_size, n))
        idx = np.concatenate([real, np.full(batch_size - len(real), real[-1])])
        mb = it.make(idx)
        yield real, mb.on_device().micro(0)


def evaluate(cfg, index: int, split: str | None, adapter: Path | None, max_examples: int | None,
             output: Path) -> dict:
    """Write the per-example lines to `output`; returns the summary."""
    import jax

    from jaxpref.data import prepare
    from jaxpref.training import setup
    from jaxpref.models import weights
    from jaxpref.objectives.logps import sequence_logps
    from jaxpref.objectives.losses import length_averaged
    from jaxpref.objectives.methods import get_method

    entry = cfg.models[index]
    pt = cfg.post_training
    bundle, tok, _, abstract = setup.model_for(cfg, index, training=False)
    prepared = prepare.data_for(cfg, tok)
    by_default = split is None and prepared.eval is None   # said once the inputs are checked
    if split is None:
        split = "eval" if prepared.eval is not None else "train"
    data = prepared.train if split == "train" else prepared.eval
    if data is None:
        raise ConfigError(f"{cfg.source}: --split eval, but the config has no eval data "
                          "(set `dataset.eval_split` or `dataset.eval_fraction`, or use --split train)")
    if not data.paired:
        raise ConfigError(f"{cfg.source}: evaluation needs paired data (prompt, chosen, rejected); "
                          "this split is unpaired (KTO)")
    rows_in, skipped = data.rows_in, dict(data.skipped)
    if max_examples is not None:
        if max_examples <= 0:
            raise ConfigError(f"--max-examples must be > 0, got {max_examples}")
        data = data.subset(np.arange(min(max_examples, len(data))))
    if len(data) == 0:
        raise ConfigError(f"{cfg.source}: the {split} split has no usable pair")

    params = bundle.runtime_params(weights.load_params(bundle))
    lora = None
    if adapter:
        lora, spec = load_adapter_for(Path(adapter), bundle, abstract, entry)
        bundle = bundle.with_args(lora_scale=spec.scale, lora_dropout=0.0, deterministic=True)
    if by_default:
        print(f"jaxpref.evaluate: note: {cfg.source} has no eval split (`dataset.eval_split` or "
              "`dataset.eval_fraction`); evaluating on the train split", file=sys.stderr)
    ref_bundle, ref_params, ref_lora = reference(cfg, index, bundle, params, abstract, tok)

    B = cfg.training.per_device_eval_batch_size
    S = 2 * B
    policy_fn = jax.jit(lambda p, lo, mb: sums_and_lengths(bundle, p, lo, mb, S))
    ref_fn = jax.jit(lambda p, lo, mb: sequence_logps(ref_bundle, p, lo, mb, S))
    beta = pt.beta
    no_reference = pt.reference_free or not get_method(pt.method).reference
    averaged = length_averaged(pt.method, cfg.loss_types)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w") as f:
        for real, mb in batches(data, B, prepared.layout):
            pol, lens = (np.asarray(x, np.float64) for x in policy_fn(params, lora, mb))
            if averaged:
                pol = pol / np.maximum(lens, 1.0)
            if no_reference:
                ref = np.zeros_like(pol)
            elif lora is None and ref_lora is None and ref_bundle is bundle:
                ref = pol  # no adapter: the policy is the reference
            else:
                ref = np.asarray(ref_fn(ref_params, ref_lora, mb), np.float64)
            for k, i in enumerate(real):
                row = {
                    "index": int(data.source[i]) if data.source else int(i),
                    "logps/chosen": float(pol[k]), "logps/rejected": float(pol[B + k]),
                    "ref_logps/chosen": float(ref[k]), "ref_logps/rejected": float(ref[B + k]),
                    "rewards/chosen": float(beta * (pol[k] - ref[k])),
                    "rewards/rejected": float(beta * (pol[B + k] - ref[B + k])),
                }
                rows.append(row)
                f.write(json.dumps(row) + "\n")
    tmp.replace(output)
    return summarize(rows, split, rows_in, skipped, output, B)


def sums_and_lengths(bundle, params, lora, mb, num_seqs: int):
    """([S] summed completion log-probs, [S] completion token counts), chosen slots then rejected."""
    import jax.numpy as jnp

    from jaxpref.objectives.logps import pair_stats, token_logps

    st = pair_stats(*token_logps(bundle, params, lora, mb), mb, num_seqs)
    return (jnp.concatenate([st.logps_chosen, st.logps_rejected]),
            jnp.concatenate([st.len_chosen, st.len_rejected]))


def reference(cfg, index: int, bundle, params, abstract, tok):
    """(bundle, params, LoRA tree or None) of the reference, as in training: the separate
    `ref_model_id` with `use_ref_model` (the base model when it names none); else, for a config
    that continues `lora.init_from`'s adapter, the base with that initial adapter (TRL's reference
    for an adapter it is given); else the base model (the adapter off)."""
    from jaxpref.lora.peft import load_adapter
    from jaxpref.models import weights
    from jaxpref.models.source import load_tokenizer, resolve
    from jaxpref.training import setup

    entry, pt = cfg.models[index], cfg.post_training
    if pt.use_ref_model and entry.ref_model_id and entry.ref_model_id != entry.huggingface_id:
        rsrc = resolve(entry.ref_model_id)
        if load_tokenizer(rsrc).get_vocab() != tok.get_vocab():
            raise ConfigError(f"{cfg.source}: reference model `{entry.ref_model_id}` has a different tokenizer from the policy")
        ref_bundle = setup.reference_bundle(cfg, rsrc)
        return ref_bundle, ref_bundle.runtime_params(weights.load_params(ref_bundle)), None
    if cfg.lora.init_from and not pt.reference_free and not pt.use_ref_model:   # training's `initial_adapter`
        lora, spec = load_adapter(Path(cfg.lora.init_from), bundle, abstract)
        return bundle.with_args(lora_scale=spec.scale, lora_dropout=0.0, deterministic=True), params, lora
    return bundle, params, None


def summarize(rows: list[dict], split: str, rows_in: int, skipped: dict, output: Path, batch: int) -> dict:
    """The metrics as TRL's `trainer.evaluate()` takes them: each eval batch's mean (batches of
    `per_device_eval_batch_size` pairs in order, the last one smaller), then the mean over batches."""
    rc = np.array([r["rewards/chosen"] for r in rows])
    rr = np.array([r["rewards/rejected"] for r in rows])
    starts = range(0, len(rows), batch)

    def mean(x) -> float:
        x = np.asarray(x, np.float64)
        return float(np.mean([np.mean(x[i:i + batch]) for i in starts]))

    return {
        "split": split,
        "examples": len(rows),
        "rewards/accuracies": mean(rc > rr),
        "rewards/margins": mean(rc - rr),
        "rewards/chosen": mean(rc),
        "rewards/rejected": mean(rr),
        "logps/chosen": mean([r["logps/chosen"] for r in rows]),
        "logps/rejected": mean([r["logps/rejected"] for r in rows]),
        "ties": int(np.sum(rc == rr)),
        "rows_in": int(rows_in),
        "skipped_rows": skipped,
        "output": str(output),
    }


RUN_RECORDS = ("metrics.jsonl", "summary.json", "samples.jsonl", "config.yaml", "FINISHED", "error.log")


def read_files(cfg, config: Path, run: str | None = None, adapter: str | None = None) -> dict[str, Path]:
    """The files this command reads, and `--run`'s records (what -> path): an --output there would
    replace them."""
    files = {"the config file": Path(config)}
    if cfg.dataset.name and Path(cfg.dataset.name).expanduser().is_file():
        files["the dataset file"] = Path(cfg.dataset.name)
    for name in RUN_RECORDS if run else ():
        files[f"the run's {name}"] = Path(run) / name
    for name in ("adapter_config.json", "adapter_model.safetensors") if adapter else ():
        files[f"the adapter's {name}"] = Path(adapter) / name
    return files


def main(argv: list[str] | None = None, prog: str = "python -m jaxpref.evaluate") -> int:
    from jaxpref.config import load_config

    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_dotenv()   # HF_TOKEN for a gated hub model
        if args.run:
            run = Path(args.run)
            if not (run / "config.yaml").is_file():
                raise ConfigError(f"--run {run}: no config.yaml (not a jaxpref run directory)")
            if args.adapter is None and (run / "adapter" / "adapter_config.json").is_file():
                args.adapter = str(run / "adapter")
        cfg = load_config(args.config or Path(args.run) / "config.yaml", args.set)
        from jaxpref.objectives.methods import offline_only
        offline_only(cfg.post_training.method, "evaluation")
        if not 0 <= args.model_index < len(cfg.models):
            raise ConfigError(f"--model-index {args.model_index} is out of range: the config has "
                              f"{len(cfg.models)} model(s)")
        if args.run and args.adapter is None:
            full_finetune_policy(cfg, Path(args.run), args.model_index)
        check_writable(args.output, "--output", directory=False)
        refuse_protected(args.output, "--output", read_files(cfg, args.config or Path(args.run) / "config.yaml",
                                                             args.run, args.adapter), "--overwrite")
        if Path(args.output).exists() and not args.overwrite:
            raise ConfigError(f"--output {args.output} exists; pass --overwrite to replace it")
        adapter = adapter_dir(args.adapter) if args.adapter else None
        summary = evaluate(cfg, args.model_index, args.split, adapter, args.max_examples, Path(args.output))
    except JaxprefError as e:
        print(f"jaxpref.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from jaxpref.runtime.host_memory import tune_malloc
    from jaxpref.runtime.no_torch import hide_torch

    hide_torch()  # jaxpref never uses torch; transformers would import it (~490 MB)
    tune_malloc()  # before any XLA computation (opt-in: JAXPREF_MALLOC_TUNING=1)
    sys.exit(main())
