"""`python -m jaxpref.report OUTPUT_DIR`: one report comparing every model trained into OUTPUT_DIR
(also written by `python -m jaxpref.train` at the end of every run).

Writes OUTPUT_DIR/report.md, a self-contained OUTPUT_DIR/report.html (its plots embedded) and the
plots as PNG files (report_curves.png). It holds:
- one table row per model, read from the run folder (`config.yaml`, `summary.json`,
  `metrics.jsonl`, `adapter/adapter_config.json`): base model, method and loss, LoRA r/alpha/targets,
  steps, epochs, wall time, tokens/s (the median of the logged windows), compile time, peak memory
  (host, and device where the backend reports it), final train and eval loss, reward accuracy and
  margins, and the method's own metrics (KTO's kl, ORPO's log-odds, CPO's nll_loss);
- overlaid curves of every model: loss, eval reward accuracy, margins, chosen/rejected log-probs;
- for a few prompts of `samples.jsonl` (`logging.sample_prompts`), the base model's completion and
  each tuned model's final one side by side;
- failed models with their one-line error.
The report files are regenerated each time (they are the report's own; nothing else is touched, and a
file of their names that is not a report of ours is refused).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from jaxpref.errors import JaxprefError, write_or_exit_2
from jaxpref.training.sinks import read_rows

SAMPLE_PROMPTS = 4
CURVES = (("loss", ("loss", "eval_loss")), ("eval reward accuracy", ("eval_rewards/accuracies",)),
          ("reward margin", ("rewards/margins", "eval_rewards/margins")),
          ("log-probs (chosen -, rejected --)", ("logps/chosen", "logps/rejected")),
          # online methods: GRPO/RLOO log TRL's `reward` and `kl`, PPO and online DPO `objective/...`
          ("reward (online)", ("reward", "objective/scores")), ("KL to the reference (online)", ("kl", "objective/kl")))
OWN = {"kto": ("kl",), "orpo": ("log_odds_ratio", "log_odds_chosen", "nll_loss"), "cpo": ("nll_loss",),
       "simpo": ("nll_loss",), "grpo": ("reward", "kl"), "rloo": ("reward", "kl"),
       "online_dpo": ("objective/scores", "objective/kl"),
       "ppo": ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg")}
COLUMNS = ("model", "base model", "method (loss)", "LoRA r / alpha / targets", "steps", "epochs", "wall s",
           "tokens/s", "compile s", "peak host MiB", "peak device MiB", "train loss", "eval loss",
           "reward acc (train / eval)", "margin (train / eval)", "own metrics")


@dataclass
class RunInfo:
    name: str
    folder: Path
    error: str | None = None
    config: dict = field(default_factory=lambda: _config(None))   # `_config`'s shape
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    adapter: dict | None = None


def _json(path: Path) -> dict:
    """A JSON object file's contents; {} when absent, unreadable or not an object."""
    try:
        return _dict(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _dict(x) -> dict:
    """`x` if it is a mapping, else {}: a record edited by hand or cut short reads as absent."""
    return x if isinstance(x, dict) else {}


def _config(data) -> dict:
    """The parts of a run's config.yaml the report reads, each of the shape it expects."""
    data = _dict(data)
    models = data.get("models") if isinstance(data.get("models"), list) else []
    return {"post_training": _dict(data.get("post_training")), "lora": _dict(data.get("lora")),
            "models": [_dict(m) for m in models]}


def _sample_ok(x: dict) -> bool:
    """A greedy sample row (it names its `model`) with what the sample table reads."""
    prompt = x.get("prompt")
    return "model" not in x or (isinstance(x.get("completion"), str) and isinstance(x.get("step"), int) and (
        isinstance(prompt, str) or isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)))


def read_run(folder: Path, error: str | None = None) -> RunInfo:
    """A run folder's record; `error` (a failure of this invocation) overrides what is on disk."""
    import yaml

    info = RunInfo(folder.name, folder, error)
    try:
        info.config = _config(yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        info.config = _config(None)
    info.summary = _json(folder / "summary.json")
    info.metrics = read_rows(folder / "metrics.jsonl")
    info.samples = [x for x in read_rows(folder / "samples.jsonl") if _sample_ok(x)]
    info.adapter = _json(folder / "adapter" / "adapter_config.json") or None
    if info.error is None and not (folder / "FINISHED").is_file():
        log = folder / "error.log"
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        last = [l for l in text.splitlines() if l.strip()][-1:]
        info.error = last[0].strip() if last else "not finished"
    return info


def find_runs(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """The run folders of `names` (in that order, those that exist), or every folder with a
    config.yaml or an error.log."""
    if names is not None:
        return [out_dir / n for n in names if (out_dir / n).is_dir()]
    return sorted(p for p in out_dir.iterdir() if p.is_dir() and ((p / "config.yaml").is_file()
                                                                   or (p / "error.log").is_file()))


# --- the table -----------------------------------------------------------------------------


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _last(rows: list[dict], key: str):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


def _base_model(r: RunInfo, default: str) -> str:
    return next(iter(r.config["models"]), {}).get("huggingface_id", default)


def row_of(r: RunInfo) -> list[str]:
    cfg, s, m = r.config, r.summary, r.metrics
    pt, lo = cfg["post_training"], cfg["lora"]
    method = pt.get("method", "dpo")
    loss = pt.get("loss_type")
    loss = ", ".join(loss) if isinstance(loss, list) else loss
    if not loss and isinstance(method, str):   # the method's default loss, named
        from jaxpref.config.schema import default_loss_type
        loss = default_loss_type(method)
    if r.adapter:
        tm = r.adapter.get("target_modules") or []
        targets = ", ".join(sorted(map(str, tm))) if isinstance(tm, list) else str(tm)
        lora = f"{_fmt(r.adapter.get('r'))} / {_fmt(r.adapter.get('lora_alpha'))} / {targets}"
    elif lo.get("enabled", True) is False:
        lora = "full fine-tune"
    else:
        lora = f"{_fmt(lo.get('r'))} / {_fmt(lo.get('lora_alpha'))} / {lo.get('target_modules')}"
    train = [x for x in m if "loss" in x or "objective/kl" in x]   # PPO logs no `loss`
    tps = [x["tokens_per_second"] for x in train[1:] if "tokens_per_second" in x]   # step 1 compiles
    fe, peak = _dict(s.get("final_eval")), _dict(s.get("peak_memory"))
    own = [f"{k} {_fmt(_last(train, k))}" for k in OWN.get(method, ()) if _last(train, k) is not None]
    base = _base_model(r, "-")
    pair = lambda key: f"{_fmt(_last(train, key), 3)} / {_fmt(fe.get('eval_' + key), 3)}"
    method_cell = method if loss == method else f"{method} ({loss or 'default'})"   # ppo: no loss of its own
    return [r.name, base, method_cell, lora, _fmt(s.get("steps")),
            _fmt(_last(train, "epoch")), _fmt(s.get("wall_time_s", s.get("train_runtime"))),
            _fmt(round(statistics.median(tps), 1)) if tps else "-", _fmt(s.get("compile_time_s")),
            _fmt(peak.get("host_rss_mib")), _fmt(peak.get("device_peak_mib")), _fmt(_last(train, "loss")),
            _fmt(fe.get("eval_loss")), pair("rewards/accuracies"), pair("rewards/margins"), "; ".join(own) or "-"]


# --- the curves ----------------------------------------------------------------------------


def plot_curves(runs: list[RunInfo], out: Path) -> Path | None:
    """One panel per curve, one colour per model (eval dashed with markers) -> a PNG, or None when
    no model logged anything."""
    if not any(r.metrics for r in runs):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, keys) for t, keys in CURVES if any(k in x for r in runs for x in r.metrics for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    axes = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes, panels):
        for i, r in enumerate(runs):
            for j, key in enumerate(keys):
                pts = [(x["step"], x[key]) for x in r.metrics if x.get(key) is not None and "step" in x]
                if not pts:
                    continue
                ev = key.startswith("eval_")
                # dashed: the second of a pair the run logs both of (rejected after chosen); a run
                # with only the second key (PPO's objective/scores for `reward`) draws it solid
                second = j == 1 and any(keys[0] in x for x in r.metrics)
                style = "o--" if ev else ("--" if second else "-")
                label = f"{r.name} (eval)" if ev else (f"_{r.name}" if second else r.name)
                ax.plot(*zip(*pts), style, color=colours[i % len(colours)], label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles: dict = {}
    for line in (x for ax in axes for x in ax.lines if not x.get_label().startswith("_")):
        handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6),
                   frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out, dpi=100, metadata=PNG_METADATA)
    plt.close(fig)
    return out


# --- the samples ---------------------------------------------------------------------------


def _key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def _shown(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def sample_table(runs: list[RunInfo]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the first prompts of the first model's samples; a column for each base
    model (its step-0 completions) and for each model (its last step's completions)."""
    # The greedy samples (`logging.sample_prompts`) name their `model`; an online run's rollouts
    # (completions with rewards) do not and are not this table's.
    with_samples = [r for r in runs if any("model" in x for x in r.samples)]
    if not with_samples:
        return [], []
    prompts = list(dict.fromkeys(_key(x["prompt"]) for x in with_samples[0].samples))[:SAMPLE_PROMPTS]
    shown = {_key(x["prompt"]): _shown(x["prompt"]) for x in with_samples[0].samples}
    columns: list[tuple[str, dict]] = []
    bases = {}
    for r in with_samples:
        base = _base_model(r, r.name)
        got = {_key(x["prompt"]): x["completion"] for x in r.samples if x.get("model") == "base"}
        if got and base not in bases:
            bases[base] = got
    columns += [(f"base: {b}", got) for b, got in bases.items()]
    for r in with_samples:
        tuned = [x for x in r.samples if x.get("model") == "tuned"]
        last = max((x["step"] for x in tuned), default=None)
        columns.append((f"{r.name} (step {last})", {_key(x["prompt"]): x["completion"] for x in tuned
                                                    if x["step"] == last}))
    header = ["prompt"] + [c for c, _ in columns]
    return header, [[shown[p]] + [got.get(p, "-") for _, got in columns] for p in prompts]


# --- writing -------------------------------------------------------------------------------


def _md_cell(s: str) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows])


def render_md(out_dir: Path, runs: list[RunInfo], ok: list[RunInfo], failed: list[RunInfo], png) -> str:
    lines = [f"# jaxpref report: {out_dir.name}", "", f"{len(ok)}/{len(runs)} model(s) trained.", "",
             "## Models", ""]
    lines += _md_table(list(COLUMNS), [row_of(r) for r in ok]) if ok else ["No model finished."]
    if png is not None:
        lines += ["", "## Curves", "", f"![curves]({png.name})"]
    header, rows = sample_table(ok)
    lines += ["", "## Samples", ""]
    lines += _md_table(header, rows) if rows else ["No samples (set `logging.sample_prompts`)."]
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{r.name}`: {_md_cell(r.error)}" for r in failed]
    return "\n".join(lines) + "\n"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f4f6}tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.samples td{white-space:pre-wrap;max-width:420px}
img{max-width:100%;border:1px solid #eee}.failed li{color:#a00}code{background:#f3f4f6;padding:0 3px}"""


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    num = lambda s: s.replace(".", "", 1).replace("-", "", 1).isdigit()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if num(str(c)) else ''}>{html.escape(str(c))}</td>"
                                    for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(out_dir: Path, runs: list[RunInfo], ok: list[RunInfo], failed: list[RunInfo], png) -> str:
    parts = [f"<h1>jaxpref report: {html.escape(out_dir.name)}</h1>",
             f"<p>{len(ok)}/{len(runs)} model(s) trained.</p>", "<h2>Models</h2>",
             _html_table(list(COLUMNS), [row_of(r) for r in ok]) if ok else "<p>No model finished.</p>"]
    if png is not None:
        data = base64.b64encode(png.read_bytes()).decode()
        parts += ["<h2>Curves</h2>", f"<img alt='curves' src='data:image/png;base64,{data}'>"]
    header, rows = sample_table(ok)
    parts += ["<h2>Samples</h2>", _html_table(header, rows, "samples") if rows
              else "<p>No samples (set <code>logging.sample_prompts</code>).</p>"]
    if failed:
        items = "".join(f"<li><code>{html.escape(r.name)}</code>: {html.escape(r.error)}</li>" for r in failed)
        parts += ["<h2>Failed</h2>", f"<ul class='failed'>{items}</ul>"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>jaxpref report: {html.escape(out_dir.name)}"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


PNG = b"\x89PNG\r\n\x1a\n"   # how every PNG file begins
# Our PNGs carry this text chunk (`PNG_METADATA`), right after their header: a PNG without it
# (a screenshot, another program's plot) is the user's.
PNG_METADATA = {"Software": "jaxpref"}
PNG_MARK = b"tEXtSoftware\x00jaxpref"
# How each report file begins: one that begins otherwise is the user's and is never replaced.
OURS = {"report.md": b"# jaxpref report: ", "report.html": b"<!doctype html><html><head><meta charset='utf-8'>"
        b"<title>jaxpref report: ", "report_curves.png": PNG}


def foreign(path: Path, head: bytes) -> bool:
    """Whether `path` is a folder, or a file that does not begin with `head` (a PNG: one without
    our `PNG_MARK`): not one of our outputs, so another hand made it and it is never replaced."""
    if path.is_dir():
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        start = f.read(256)
    return not start.startswith(head) or (head == PNG and PNG_MARK not in start)


def check_ours(out_dir: Path) -> None:
    """Refuse, in one line, to replace a file of the report's names that another hand wrote."""
    for name, head in OURS.items():
        p = out_dir / name
        if foreign(p, head):
            raise JaxprefError(f"{p} is not a report of jaxpref's, and the report would replace it; move it "
                               "away, or train into another output folder")


def write_report(out_dir: Path, names: list[str] | None = None, errors: dict[str, str] | None = None
                 ) -> Path | None:
    """report.md, report.html and report_curves.png in `out_dir` for the runs `names` (all run
    folders when None); `errors`: name -> the one-line error of a model that failed just now.
    -> report.html, or None when `out_dir` does not exist (nothing ran)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    errors = errors or {}
    folders = find_runs(out_dir, names)
    # A model refused or failed before it touched its folder (a rerun without --resume) keeps the
    # finished run there: that run is shown, and the failure is listed beside it.
    kept = {n for n in errors if (out_dir / n / "FINISHED").is_file()}
    runs = [read_run(f, None if f.name in kept else errors.get(f.name)) for f in folders]
    runs += [RunInfo(n, out_dir / n, e) for n, e in errors.items() if not (out_dir / n).is_dir()]
    ok = [r for r in runs if r.error is None]
    failed = [r for r in runs if r.error is not None]
    failed += [RunInfo(n, out_dir / n, f"{errors[n]} (its folder still holds the finished run above)")
               for n in sorted(kept)]
    check_ours(out_dir)
    png = plot_curves(ok, out_dir / "report_curves.png")
    (out_dir / "report.md").write_text(render_md(out_dir, runs, ok, failed, png))
    (out_dir / "report.html").write_text(render_html(out_dir, runs, ok, failed, png))
    return out_dir / "report.html"


def main(argv: list[str] | None = None, prog: str = "python -m jaxpref.report") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="report.md / report.html comparing every model "
                                 "trained into OUTPUT_DIR (one run folder per model).")
    ap.add_argument("output_dir", metavar="OUTPUT_DIR", help="the folder `train` wrote its run folders into")
    out = Path(ap.parse_args(argv).output_dir)
    if not out.is_dir():
        print(f"jaxpref.report: error: {out} is not a folder", file=sys.stderr)
        return 2
    if not find_runs(out):
        print(f"jaxpref.report: error: {out} holds no run folder (one with a config.yaml)", file=sys.stderr)
        return 2
    page, code = write_or_exit_2("jaxpref.report", lambda: write_report(out), f"the report in {out}")
    if code == 0:
        print(page)
    return code


if __name__ == "__main__":
    sys.exit(main())
