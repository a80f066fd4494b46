"""`python -m jaxpref.train --config FILE` (or `jaxpref train`): post-train every model of a config,
one after another. Called, this module is the Python API (`jaxpref.train(config, ...)`, `jaxpref.api`).

Each model trains into `<output-dir>/<name>/` with `config.yaml`, `metrics.jsonl`, `adapter/`
(PEFT) and `summary.json`. A failing model is reported and the next one still runs; the exit code
is 0 when all succeeded, 2 when one failed on bad input, 1 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
import types
from pathlib import Path

from jaxpref.api import check_overwrite, output_root, record_refusal, select_models, train_one, write_report
from jaxpref.api import train as api_train
from jaxpref.config import load_config
from jaxpref.errors import JaxprefError, check_writable
from jaxpref.runtime.env import load_dotenv


def parse_args(argv, prog: str = "python -m jaxpref.train"):
    ap = argparse.ArgumentParser(prog=prog,
                                 description="Preference post-training (DPO, IPO, KTO, ORPO, SimPO, CPO; online: GRPO, RLOO, online DPO, PPO) with LoRA in JAX.")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="YAML config file")
    which.add_argument("--print-config", metavar="FILE",
                       help="print FILE's resolved config (every key, its default and help) and exit")
    ap.add_argument("--model-index", type=int, default=None, help="train only models[I]")
    ap.add_argument("--output-dir", default=None,
                    help="output root (default: training.output_dir, else checkpoints)")
    ap.add_argument("--resume", action="store_true", help="continue each model from its latest checkpoint")
    ap.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                    help="continue from the kept checkpoint of STEP (later ones are set aside, not deleted)")
    ap.add_argument("--resume-force", action="store_true",
                    help="resume even if the base model or training-critical config changed")
    ap.add_argument("--overwrite-output-dir", action="store_true",
                    help="start afresh in a run folder that holds a previous run, deleting its checkpoints "
                         "and outputs (without it such a folder is refused; --resume continues it)")
    ap.add_argument("--dry-run", action="store_true", help="check config, model shapes and data without training")
    ap.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value by dotted path, e.g. training.learning_rate=1e-5")
    return ap.parse_args(argv)


def check_flags(args) -> None:
    """Flags that cannot all be obeyed are refused rather than one of them silently dropped."""
    resume = [f for f, on in (("--resume", args.resume), ("--resume-from", args.resume_from is not None),
                              ("--resume-force", args.resume_force)) if on]
    check_overwrite(args.overwrite_output_dir, resume[0] if resume else None, "--overwrite-output-dir")
    if args.print_config:
        unused = [f for f, on in (("--model-index", args.model_index is not None), ("--output-dir", args.output_dir),
                                  ("--overwrite-output-dir", args.overwrite_output_dir), ("--dry-run", args.dry_run))
                  if on] + resume
        if unused:
            raise JaxprefError(f"{unused[0]} does not apply to --print-config, which only prints the config "
                               "(--set and --max-steps apply); use --config FILE for a run")


def quiet_background_writes() -> None:
    """Orbax logs the tracebacks of a failed background write (a full disk) through absl and
    asyncio, and tensorstore's writes still pending then fail on Orbax's closed event loop (reported
    as unraisable exceptions); the failure itself is raised to the run and reported in one line."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    previous = sys.unraisablehook
    if getattr(previous, "jaxpref_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)
    hook.jaxpref_quiet = True
    sys.unraisablehook = hook


def report_failure(name: str, run_dir: Path, e: Exception) -> int:
    """One line for an unexpected failure, its traceback in `<run>/error.log` when that can be
    written. A full disk or a folder that cannot be written is the user's to fix: exit code 2,
    naming the file; the checkpoints already whole are kept. -> the exit code."""
    from jaxpref.errors import os_error_line

    tb = traceback.format_exc()
    where = ""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.log").write_text(tb)
        where = f" (traceback in {run_dir / 'error.log'})"
    except Exception as log_error:  # the disk that failed the run may fail this too
        where = f" (traceback not saved: {type(log_error).__name__})"
    io_problem = os_error_line(e)
    if io_problem is not None:
        ckpts = run_dir / "checkpoints"
        kept = f"; the checkpoints already whole in {ckpts} are kept (continue with --resume)" if ckpts.is_dir() else ""
        print(f"jaxpref: error: model `{name}`: {io_problem}{kept}", file=sys.stderr)
        return 2
    msg = " ".join(str(e).split())[:500] if str(e) else ""
    print(f"jaxpref: error: model `{name}` failed: {type(e).__name__}: {msg}{where}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None, prog: str = "python -m jaxpref.train") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_background_writes()
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    try:
        check_flags(args)
        if args.print_config:
            from jaxpref.config.describe import describe
            from jaxpref.config.parse import with_config_paths_resolved
            print(describe(with_config_paths_resolved(load_config(args.print_config, overrides))), end="")
            return 0
        load_dotenv()
        cfg = load_config(args.config, overrides)
        out_root = output_root(cfg, args.output_dir)
        logging.getLogger().setLevel(cfg.logging.log_level.upper())
        from jaxpref.objectives.methods import get_method
        online = get_method(cfg.post_training.method).online
        if online:
            from jaxpref.training.online_loop import check_online
            check_online(cfg)
        indices = select_models(cfg, args.model_index)
        if args.resume_from is not None and args.resume_from < 1:
            raise JaxprefError(f"--resume-from {args.resume_from}: a checkpoint's step is >= 1")
        if not args.dry_run:
            check_writable(out_root, "--output-dir" if args.output_dir else "training.output_dir", directory=True)
            from jaxpref.runtime.mesh import init_distributed
            init_distributed(cfg.gpu, cfg.source)
        if args.dry_run:
            from jaxpref.training.dryrun import dry_run
            from jaxpref.training.dryrun_resume import ResumeAsk
            ask = ResumeAsk(out_root, args.resume_force, args.resume_from, overwrite=args.overwrite_output_dir,
                            resume=args.resume or args.resume_force or args.resume_from is not None)
            if online:
                from jaxpref.training.online_dryrun import check_online_model
                return dry_run(cfg, indices, check_online_model, ask)
            return dry_run(cfg, indices, resume=ask)
    except JaxprefError as e:
        print(f"jaxpref: error: {e}", file=sys.stderr)
        return 2
    import jax

    resume = args.resume or args.resume_force or args.resume_from is not None
    codes, errors = [], {}
    for i in indices:
        entry = cfg.models[i]
        try:
            train_one(cfg, i, out_root, resume, args.resume_from, args.resume_force, args.overwrite_output_dir)
            codes.append(0)
        except JaxprefError as e:
            print(f"jaxpref: error: model `{entry.name}`: {e}", file=sys.stderr)
            codes.append(2)
            errors[entry.name] = " ".join(str(e).split())
            record_refusal(out_root / entry.name, errors[entry.name])
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # report, keep the traceback in the run folder, go on
            codes.append(report_failure(entry.name, out_root / entry.name, e))
            errors[entry.name] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
    if len(indices) > 1:
        ok = sum(c == 0 for c in codes)
        print(f"jaxpref: {ok}/{len(indices)} model(s) trained", file=sys.stderr)
    if jax.process_index() == 0:
        write_report(out_root, [m.name for m in cfg.models], errors, quiet=bool(errors))
    if all(c == 0 for c in codes):
        return 0
    return 2 if 2 in codes else 1


class _CallableModule(types.ModuleType):
    """This module is the command line (`python -m jaxpref.train`, `main`) and, called, the Python
    API: `jaxpref.train(config, output_dir=..., model_index=...)` is `jaxpref.api.train`."""

    def __call__(self, *args, **kwargs):
        return api_train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    from jaxpref.runtime.host_memory import tune_malloc
    from jaxpref.runtime.no_torch import hide_torch

    hide_torch()  # jaxpref never uses torch; transformers would import it (~490 MB)
    tune_malloc()  # before any XLA computation (opt-in: JAXPREF_MALLOC_TUNING=1)
    sys.exit(main())
