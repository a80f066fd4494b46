"""`--dry-run`: check every model of a config without training and without reading weight values.

Per model: architecture, parameter counts (total, trainable), LoRA targets, data format and
counts, token lengths, batch shapes, steps per epoch, and a memory plan. Exit 0 when all is well,
2 with every problem listed otherwise.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np

from jaxpref.data import prepare
from jaxpref.data.batches import shape_parts
from jaxpref.training import setup
from jaxpref.training.evaluation import check_eval
from jaxpref.config import Config
from jaxpref.errors import JaxprefError
from jaxpref.lora.tree import count, target_shapes
from jaxpref.models import weights
from jaxpref.runtime.memory import format_bytes, memory_plan
from jaxpref.runtime.mesh import per_device_elements

def _weights_kind(bundle) -> str | None:
    if bundle.source.spec.endswith(".gguf"):
        return None  # a GGUF read for its metadata only: its tensors are checked when converted
    # No readable weights (only pickles, a broken index) fails here as it fails in training.
    return weights.weight_files(bundle.source.path, bundle.source.spec)[0]


def check_weights_and_lora(cfg: Config, index: int):
    """The model part of the check, printed: architecture and parameter counts, from the config
    and the weight headers. -> (bundle, tokenizer, LoRA spec, abstract params, mesh, total,
    trainable); a JaxprefError names what is wrong."""
    bundle, tok, spec, abstract = setup.model_for(cfg, index, training=True, weights_needed=False)
    if _weights_kind(bundle) == "safetensors":
        weights.check_weights(bundle)  # names and shapes from the headers; no value is read
    # r against each targeted layer, as the LoRA init in training checks it
    targets = {} if spec is None else target_shapes(abstract, spec, cfg.source)
    from jaxpref.runtime.mesh import make_mesh
    mesh = make_mesh(cfg.gpu, cfg.source)  # a mesh or device ids that this machine lacks
    args = bundle.args
    total = count(abstract)
    trainable = count(abstract) if spec is None else sum(
        s[0] * (s[1] + s[2]) * spec.r if len(s) == 3 else (s[0] + s[1]) * spec.r
        for s in targets.values())
    print(f"  architecture     {bundle.source.model_type}: {args.num_layers} layers, hidden {args.hidden_size}, "
          f"{args.num_heads} heads, vocab {args.vocab_size}, tied embeddings {args.tie_word_embeddings}")
    print(f"  parameters       {total:,} total, {trainable:,} trainable "
          + (f"(LoRA r={spec.r}, alpha={spec.alpha:g}, targets {', '.join(spec.targets)})" if spec else "(full fine-tune)"))
    check_reference(cfg, index, tok, spec is not None)
    return bundle, tok, spec, abstract, mesh, total, trainable


def check_reference(cfg: Config, index: int, tok, lora_enabled: bool) -> None:
    """A separate reference model named by `ref_model_id`, checked as the run loads it
    (`assemble._reference_model`): found, the policy's tokenizer, its weight names and shapes."""
    entry = cfg.models[index]
    if not entry.ref_model_id or entry.ref_model_id == entry.huggingface_id or \
            setup.ref_mode(cfg, setup.loss_spec(cfg), lora_enabled) != "separate":
        return
    rid, rsrc = setup.reference_source(cfg, entry, tok)
    ref = setup.reference_bundle(cfg, rsrc)
    if _weights_kind(ref) == "safetensors":
        weights.check_weights(ref)
    print(f"  reference        {rid} ({ref.source.model_type}, separate, frozen)")


def check_sample_prompts(cfg: Config, tok) -> None:
    """A `logging.sample_prompts` file, read and tokenized as the run does at its start
    (`training.samples.prompts`)."""
    source = cfg.logging.sample_prompts
    if isinstance(source, str):
        from jaxpref.generation import text
        for i, p in enumerate(text.read_prompts(source, "logging.sample_prompts")):
            text.prompt_ids(tok, p, f"logging.sample_prompts {source}: prompt {i + 1}")


def check_model(cfg: Config, index: int, resume=None) -> list[str]:
    """The dry run of an offline model (`resume`: a `dryrun_resume.ResumeAsk` or None)."""
    entry = cfg.models[index]
    name = entry.name
    problems: list[str] = []
    t0 = time.time()
    print(f"== model {index}: {name} ({entry.huggingface_id})")
    try:
        bundle, tok, spec, abstract, mesh, total, trainable = check_weights_and_lora(cfg, index)
    except JaxprefError as e:
        return [f"model `{name}`: {e}"]
    args = bundle.args
    try:
        prepared = prepare.data_for(cfg, tok)
    except JaxprefError as e:
        problems.append(f"model `{name}`: {e}")
        return problems
    tr = prepared.train
    print(f"  data             format {tr.format}, {tr.rows_in} rows in, {len(tr)} usable"
          + (f", eval {len(prepared.eval)}" if prepared.eval is not None else ""))
    skipped = {k: v for k, v in tr.skipped.items()}
    print(f"  rows skipped     {sum(skipped.values())}" + (f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""))
    if cfg.dataset.eval_split and prepared.eval is not None:
        ev = prepared.eval.skipped
        print(f"  eval skipped     {sum(ev.values())}" + (f" ({', '.join(f'{k}: {v}' for k, v in ev.items())})" if ev else ""))
    print(f"  rows truncated   {prepared.report.truncated}; dropped (prompt fills max_length) {prepared.report.dropped}")
    if tr.prompt_boundary_mismatches:
        print(f"  warning          {tr.prompt_boundary_mismatches} rows: tokenized prompt is not a prefix of prompt+completion")
    if tr.paired:
        lens = np.array([len(p) + max(len(c), len(r)) for p, c, r in zip(tr.prompt, tr.chosen, tr.rejected)])
    else:
        lens = np.array([len(p) + len(c) for p, c in zip(tr.prompt, tr.completion)])
    print(f"  token lengths    p50 {int(np.percentile(lens, 50))}, p95 {int(np.percentile(lens, 95))}, max {int(lens.max())} "
          f"(max_length {cfg.training.max_length})")
    t = cfg.training
    # As the run builds it (`assemble`): the global batch, one padding-free stream per data-parallel shard.
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    B, G = t.per_device_train_batch_size * dp, t.gradient_accumulation_steps
    if not tr.paired and cfg.post_training.method != "kto":
        problems.append(f"model `{name}`: unpaired data needs method kto")
        return problems
    try:
        layout = dataclasses.replace(setup.router_aux_layout(cfg, bundle, prepared.layout), streams=dp)
        it = setup.train_iterator(cfg, tr, B, G, layout)
    except JaxprefError as e:
        problems.append(f"model `{name}`: {e}")
        return problems
    if it.steps_per_epoch == 0:
        problems.append(f"model `{name}`: {len(tr)} usable rows are fewer than one step's {B * G} pairs")
        return problems
    try:
        check_eval(cfg, prepared.eval, dp)
        check_sample_prompts(cfg, tok)
    except JaxprefError as e:
        problems.append(f"model `{name}`: {e}")
        return problems
    steps = t.total_steps(it.steps_per_epoch)
    setup.plan_shapes(it, cfg, bundle.args, abstract, steps)
    args = setup.resolve_recompute(cfg, bundle, abstract, spec, setup.planned_keys(cfg, it), mesh).args   # what `auto` will choose
    shapes = _batch_lines(it, steps, layout, cfg.training)
    print(f"  schedule         {it.steps_per_epoch} steps/epoch, {steps} steps, "
          + ("the last one shorter" if it.last_short and len(tr) % (B * G) else
             f"{len(tr) - it.steps_per_epoch * B * G} rows/epoch left over by the batch size"))
    plan = memory_plan(cfg, args, total, trainable, list(shapes), mesh=mesh,
                       base_per_device=per_device_elements(abstract, mesh, bundle.arch.roles))
    print(f"  attention        {attention_line(cfg, args, list(shapes), mesh)}")
    print(f"  mesh             {mesh_line(cfg, mesh)}; per device:")
    print("  memory plan      " + ", ".join(f"{k} {format_bytes(v)}" for k, v in plan.items() if v))
    if resume is not None:
        from jaxpref.models.source import fingerprint
        from jaxpref.training.dryrun_resume import resume_problems
        fp = lambda: setup.critical_fingerprint(cfg, cfg.models[index], fingerprint(bundle.source), layout.kind,
                                                layout.padding_free, tr, data_parallel=dp)
        problems += resume_problems(cfg, index, fp, resume, steps)
    print(f"  checked in {time.time() - t0:.1f} s")
    return problems


def _batch_lines(it, steps: int, layout, training) -> dict:
    """Print the batch shapes of the first 200 steps, the layout they have and the settings that
    chose it (and a token budget's micro-batch plan); -> {shape key: steps}."""
    shapes, seen = {}, []
    for _ in range(min(steps, 200)):
        b, _ = next(it)
        for key in shape_parts(b.shape_key):
            shapes[key] = shapes.get(key, 0) + 1
        seen.append(b)
    shape_txt = ", ".join(f"{s} x{n}" for s, n in sorted(shapes.items()))
    blocks = ", blocks, block slots" if layout.padding_free else ""
    blocks += ", pair slots" if layout.max_tokens else ""
    chosen = f"layout {layout.kind}{', padding-free' if layout.padding_free else ''} (training.pair_layout " \
             f"{training.pair_layout}, padding_free {str(training.padding_free).lower()})"
    print(f"  batches          [accum, rows, tokens, target slots{blocks}]: {shape_txt} ({chosen}"
          f"{'; planned' if it.shapes else ''}{'' if steps <= 200 else ', first 200 steps'})")
    if layout.max_tokens:
        from jaxpref.data.budget import plan_line
        print(f"  micro-batches    {plan_line(it, seen)}")
    return shapes


def dry_run(cfg: Config, indices: list[int], check=None, resume=None) -> int:
    """Check the models `indices` with `check(cfg, index, resume) -> problems` (default
    `check_model`; an online method's is `online_dryrun.check_online_model`; `resume`: a
    `dryrun_resume.ResumeAsk`: the run folder to start or continue). -> the exit code."""
    check = check or check_model
    problems: list[str] = []
    print(f"jaxpref dry run of {cfg.source}: method {cfg.post_training.method}, "
          f"loss {'+'.join(cfg.loss_types)}, beta {cfg.post_training.beta}, devices {len(jax.devices())} "
          f"({jax.devices()[0].platform})")
    for i in indices:
        problems += check(cfg, i, resume)
    if problems:
        for p in problems:
            print(f"jaxpref: error: {p}", file=sys.stderr)
        return 2
    print("dry run OK")
    return 0


def attention_line(cfg: Config, args, shapes: list, mesh) -> str:
    """The attention backend `training.attention` resolves to for the largest batch shape, and
    the activation recompute setting."""
    from jaxpref.models.attention import choose_backend

    key = max(shapes, key=lambda k: k[1] * k[2])
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    calls, t = (max(key[1] // dp, 1) * key[4], key[5]) if len(key) > 4 else (max(key[1] // dp, 1), key[2])
    platform = jax.devices()[0].platform
    backend = choose_backend(cfg.training.attention, platform, args.dtype, calls, t, t, args.num_heads)
    precision = cfg.training.matmul_precision
    if precision == "tf32" and platform == "cpu":
        precision = "fp32 (matmul_precision tf32: a CPU has no TF32 products)"
    return (f"{backend} (training.attention {cfg.training.attention}); recompute_activations "
            f"{args.recompute_activations}; fp32 matmuls {precision}")


def mesh_line(cfg: Config, mesh) -> str:
    """The mesh the dry run planned with. It does not join `gpu.distributed`: with it, the mesh,
    batch and schedule above are this process's devices' alone, and the line says so."""
    line = f"{dict(mesh.shape)} over {mesh.devices.size} device(s)"
    if cfg.gpu.distributed is not None and jax.process_count() == 1:
        line += (" of this process only (a dry run does not join `gpu.distributed`; the run's mesh, global batch "
                 "and steps count every process's devices)")
    return line
