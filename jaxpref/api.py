"""The Python API. `jaxpref.train(...)` trains as the command line does and returns each model's
summary (what `summary.json` holds):

    import jaxpref
    summaries = jaxpref.train("configs/quickstart.yaml", output_dir="runs")
    summaries = jaxpref.train({"models": [...], "post_training": {"method": "dpo"}, ...},
                              train_dataset=my_dataset, eval_dataset=my_eval_dataset)

Bad input raises `jaxpref.errors.JaxprefError` (one line naming what is wrong and where).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from jaxpref.config import Config, config_from_dict
from jaxpref.config.parse import apply_overrides, read_config_data

from jaxpref.errors import JaxprefError

IN_MEMORY = "in-memory datasets.Dataset"


def _dataset_name(train_dataset) -> str:
    fp = getattr(train_dataset, "_fingerprint", None)
    return f"{IN_MEMORY} ({len(train_dataset)} rows{', fingerprint ' + fp if fp else ''})"


def load(config: str | Path | dict | Config, overrides: list[str] | None = None, train_dataset=None,
         eval_dataset=None) -> Config:
    """A config from a YAML path, a dict (the YAML's sections) or a `Config`, checked, with
    `--set`-style `overrides` and `datasets.Dataset` splits in place of `dataset.name`."""
    if isinstance(config, Config):
        if overrides:
            raise TypeError("overrides apply to a path or a dict; change the Config's fields instead")
        cfg = copy.deepcopy(config)
    else:
        if isinstance(config, dict):
            data, src = copy.deepcopy(config), "<dict>"
            apply_overrides(data, overrides, src)
        else:
            data, src = read_config_data(config, overrides), str(config)
        if train_dataset is not None and isinstance(data.get("dataset", {}), dict):
            data.setdefault("dataset", {})["name"] = _dataset_name(train_dataset)
        cfg = config_from_dict(data, src)
    ds = cfg.dataset
    if train_dataset is not None:
        ds.name, ds.data_files, ds.split = _dataset_name(train_dataset), None, "train"
        ds.objects["train"] = train_dataset
    if eval_dataset is not None:
        ds.eval_split, ds.eval_fraction = "eval", 0.0
        ds.objects["eval"] = eval_dataset
    return cfg


def train(config: str | Path | dict | Config, output_dir: str | Path | None = None, model_index: int | None = None,
          train_dataset=None, eval_dataset=None, overrides: list[str] | None = None, resume: bool = False,
          resume_from: int | None = None, overwrite_output_dir: bool = False) -> dict[str, dict[str, Any]]:
    """Train every model of `config` (or only `models[model_index]`), each into
    `<output_dir>/<name>/` (default: `training.output_dir`, else checkpoints/).

    config: a YAML path, a dict of sections, or a `jaxpref.config.Config`;
    train_dataset / eval_dataset: `datasets.Dataset` objects used instead of `dataset.name` /
      the eval split (rows as the config's columns name them);
    overrides: ["training.learning_rate=1e-5", ...], as `--set`;
    resume / resume_from / overwrite_output_dir: as the command line's flags.
    -> {model name: its summary}. As the command line, a model that fails does not stop the
    others: every model is trained, `<output_dir>/report.md` and `report.html` are (re)written over
    the config's models (the failures listed), and then the first failure's error is raised."""
    import jax

    from jaxpref.runtime.mesh import init_distributed

    check_arguments(config, output_dir, model_index, train_dataset, eval_dataset, overrides, resume_from)
    check_overwrite(overwrite_output_dir, "resume" if resume else "resume_from" if resume_from is not None else None)
    cfg = load(config, overrides, train_dataset, eval_dataset)
    out_root = output_root(cfg, str(output_dir) if output_dir is not None else None)
    init_distributed(cfg.gpu, cfg.source)
    resume = resume or resume_from is not None
    out, errors, first = {}, {}, None
    for i in select_models(cfg, model_index):
        name = cfg.models[i].name
        try:
            out[name] = train_one(cfg, i, out_root, resume, resume_from, overwrite=overwrite_output_dir)
        except KeyboardInterrupt:
            raise
        except Exception as e:   # as the command line: the next model still trains
            first = first or e
            text = str(e) if isinstance(e, JaxprefError) else f"{type(e).__name__}: {e}"
            errors[name] = " ".join(text.split())[:500]
            if isinstance(e, JaxprefError):
                record_refusal(out_root / name, errors[name])
    if jax.process_index() == 0:
        write_report(out_root, [m.name for m in cfg.models], errors, quiet=True)
    if first is not None:
        raise first
    return out


def check_arguments(config, output_dir, model_index, train_dataset, eval_dataset, overrides, resume_from) -> None:
    """`train`'s arguments of a wrong type, in one line naming the argument (a TypeError or an
    AttributeError from deep inside before; a string of overrides was read letter by letter, an
    int output_dir made a folder `5`)."""
    import datasets

    def bad(name: str, want: str, value) -> JaxprefError:
        return JaxprefError(f"jaxpref.train: `{name}` must be {want}, got {type(value).__name__} "
                            f"{' '.join(repr(value).split())[:80]}")

    if not isinstance(config, (str, Path, dict, Config)):
        raise bad("config", "a YAML path, a dict of sections or a jaxpref.config.Config", config)
    if output_dir is not None and not isinstance(output_dir, (str, Path)):
        raise bad("output_dir", "a path", output_dir)
    for name, value in (("model_index", model_index), ("resume_from", resume_from)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(name, "an integer", value)
    for name, value in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if value is not None and not isinstance(value, datasets.Dataset):
            split = " (a DatasetDict: pass one of its splits, e.g. d['train'])" \
                if isinstance(value, datasets.DatasetDict) else ""
            raise bad(name, "a datasets.Dataset" + split, value)
    if overrides is not None and (isinstance(overrides, str) or not isinstance(overrides, (list, tuple))
                                  or not all(isinstance(o, str) for o in overrides)):
        raise bad("overrides", 'a list of "KEY=VALUE" strings', overrides)


def check_overwrite(overwrite: bool, resume: str | None, flag: str = "overwrite_output_dir") -> None:
    """Overwriting a run folder and continuing it (`resume`: the flag that asks, or None) cannot both
    be done: refused rather than one of them silently dropped."""
    if overwrite and resume:
        raise JaxprefError(f"{flag} deletes a run folder's previous run and {resume} continues it; give one of them")


def select_models(cfg: Config, index: int | None) -> list[int]:
    if index is None:
        return list(range(len(cfg.models)))
    if not 0 <= index < len(cfg.models):
        raise JaxprefError(f"--model-index {index} is out of range: the config has {len(cfg.models)} model(s)")
    return [index]


def train_one(cfg: Config, index: int, out_root: Path, resume: bool = False, resume_from: int | None = None,
              resume_force: bool = False, overwrite: bool = False) -> dict:
    """Train `cfg.models[index]` into `<out_root>/<name>/` (claimed for this process first);
    returns its summary."""
    import jax

    from jaxpref.training.loop import train_model
    from jaxpref.training.rundir import check_not_an_input, claim_run_dir

    from jaxpref.objectives.methods import get_method

    online = get_method(cfg.post_training.method).online
    if online:
        from jaxpref.training.online_loop import check_online, train_online
        check_online(cfg)
    run_dir = Path(out_root) / cfg.models[index].name
    check_not_an_input(run_dir, cfg, index)
    # One writer per run folder; a previous run is continued or replaced only when asked.
    with claim_run_dir(run_dir, resume, overwrite, lock=jax.process_index() == 0,
                       method=cfg.post_training.method):
        if online:
            run_cls = None
            if cfg.post_training.method == "ppo":
                from jaxpref.training.ppo_loop import PpoRun as run_cls
            return train_online(cfg, index, run_dir, resume=resume, resume_from=resume_from,
                                resume_force=resume_force, run_cls=run_cls)
        return train_model(cfg, index, run_dir, resume=resume, resume_from=resume_from,
                           resume_force=resume_force)


def output_root(cfg: Config, flag: str | None) -> Path:
    """--output-dir, else the config's `training.output_dir`, else checkpoints/ (`~` expanded, as
    for the model and data paths: some writers expanded it and others did not)."""
    return Path(flag or cfg.training.output_dir or "checkpoints").expanduser()


def record_refusal(run_dir: Path, line: str) -> None:
    """A model refused on bad input leaves its one-line error in `<run>/error.log` where its folder
    is absent or holds nothing but its `.lock` and an earlier error.log (it never held a run), so
    that a later `jaxpref report` lists it as the run's report did; a folder holding anything else
    (a previous run) is left as it is."""
    try:
        if run_dir.is_dir() and any(p.name not in (".lock", "error.log") for p in run_dir.iterdir()):
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.log").write_text(line + "\n")
    except OSError:
        pass


def write_report(out_root: Path, names: list[str], errors: dict[str, str], quiet: bool) -> None:
    """report.md / report.html over the config's models (`quiet`: written without a line, after
    the failures' one-line errors); a report must never fail the run."""
    import sys

    from jaxpref.report import write_report as write

    try:
        page = write(out_root, names, errors)
        if page is not None and not quiet:
            print(f"jaxpref: report: {page}", file=sys.stderr)
    except Exception as e:
        print(f"jaxpref: warning: report not written ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)
