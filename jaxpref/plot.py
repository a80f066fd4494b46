"""`python -m jaxpref.plot RUN_DIR` (or `jaxpref plot`): loss, reward accuracy and margins against
steps (train and eval) from a run's metrics.jsonl, written to RUN_DIR/metrics.png. A method that
does not log a panel's metric shows its alternative (KTO: its KL estimate for the accuracy) or
leaves the panel out."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Each panel: the metrics it may show, the first one logged wins.
PANELS = (("loss",), ("rewards/accuracies", "kl"), ("rewards/margins",))
TITLES = {"loss": "loss", "rewards/accuracies": "reward accuracy", "kl": "KL estimate",
          "rewards/margins": "reward margin"}


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl that carry a numeric step (a row cut short by a killed run,
    not an object, or bytes that are not UTF-8 JSON, are left out; the others still plot)."""
    from jaxpref.training.sinks import read_rows as jsonl_rows

    return [r for r in jsonl_rows(Path(run_dir) / "metrics.jsonl") if _number(r.get("step"))]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def panels_for(rows: list[dict]) -> list[str]:
    """The metric each panel shows: the first of its choices that a row (train or eval) has."""
    out = []
    for choices in PANELS:
        found = next((k for k in choices if any(k in r or f"eval_{k}" in r for r in rows)), None)
        if found:
            out.append(found)
    return out


def plot_run(run_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxpref.errors import JaxprefError
    from jaxpref.report import PNG, PNG_METADATA, foreign

    run_dir = Path(run_dir)
    out = run_dir / "metrics.png"
    if foreign(out, PNG):   # a metrics.png that is not a plot of ours is the user's
        raise JaxprefError(f"{out} is not a plot of jaxpref's, and the plot would replace it; move it away")
    rows = read_rows(run_dir)
    if not rows:
        raise JaxprefError(f"{run_dir / 'metrics.jsonl'} has no metrics rows (JSON lines with a `step`)")
    keys = panels_for(rows) or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            pts = [(r["step"], r[prefix + key]) for r in rows if _number(r.get(prefix + key))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label="eval" if prefix else "train")
        ax.set_title(TITLES.get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata=PNG_METADATA)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None, prog: str = "python -m jaxpref.plot") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Plot a run's metrics.jsonl into RUN_DIR/metrics.png.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holds metrics.jsonl)")
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        print(f"jaxpref.plot: error: {run} has no metrics.jsonl", file=sys.stderr)
        return 2
    from jaxpref.errors import write_or_exit_2

    png, code = write_or_exit_2("jaxpref.plot", lambda: plot_run(run), str(run / "metrics.png"))
    if code == 0:
        print(png)
    return code


if __name__ == "__main__":
    sys.exit(main())
