"""`python -m jaxpref.plot RUN_DIR`: loss, reward accuracy and margins against steps (train and
eval) from a run's metrics.jsonl, written to RUN_DIR/metrics.png."""
from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


def plot_run(run_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a row cut short by a killed run; the others still plot
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            pts = [(r["step"], r[prefix + key]) for r in rows if prefix + key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label="eval" if prefix else "train")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jaxpref.plot RUN_DIR", file=sys.stderr)
        return 2
    run = Path(argv[0])
    if not (run / "metrics.jsonl").is_file():
        print(f"jaxpref.plot: error: {run} has no metrics.jsonl", file=sys.stderr)
        return 2
    print(plot_run(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
