"""What each pair layout costs over one epoch of a config's data: shapes, padding, tokens.

    uv run python scripts/data_report.py [--config configs/quickstart.yaml] [--buckets 64,96,128]

For `concatenated` and `shared_prompt` it builds every batch of one epoch exactly as training does
(prepare.data_for + BatchIterator) and reports the distinct padded lengths T (each is one
compile), the padding fraction of the [N, T] token grid and of the [N, K] target grid, and the
real and padded token counts, with the ratio shared_prompt / concatenated.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(cfg, tok, kind: str, buckets: list[int] | None) -> dict:
    from jaxpref.data import prepare
    from jaxpref.data.iterator import BatchIterator

    cfg.training.pair_layout = kind
    cfg.training.length_buckets = buckets
    prepared = prepare.data_for(cfg, tok)
    t = cfg.training
    it = BatchIterator(prepared.train, t.per_device_train_batch_size, t.gradient_accumulation_steps,
                       t.seed, prepared.layout)
    lengths, shapes = set(), set()
    real = grid = targets = target_grid = 0
    for _ in range(it.steps_per_epoch):
        b, _ = next(it)
        lengths.add(b.input_ids.shape[-1])
        shapes.add(tuple(sorted((k, v.shape) for k, v in b.items())))
        real += int((b.segment_ids > 0).sum())
        grid += b.segment_ids.size
        targets += int(((b.tgt_seq < 2 * t.per_device_train_batch_size) | (b.tgt_full > 0)).sum())
        target_grid += b.tgt_seq.size
    return {
        "layout": kind,
        "pairs": len(prepared.train),
        "steps": it.steps_per_epoch,
        "lengths_T": sorted(lengths),
        "buckets": len(lengths),
        "shapes": len(shapes),
        "real_tokens": real,
        "grid_tokens": grid,
        "padding_fraction": round(1 - real / grid, 4),
        "target_padding_fraction": round(1 - targets / target_grid, 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--buckets", default=None, help="comma-separated length buckets (default: the config's)")
    args = ap.parse_args(argv)

    from jaxpref.config import load_config
    from jaxpref.models.source import load_tokenizer, resolve

    cfg = load_config(args.config, [f"training.max_length={args.max_length}",
                                    f"training.per_device_train_batch_size={args.batch_size}",
                                    "training.gradient_accumulation_steps=1"])
    entry = cfg.models[0]
    tok = load_tokenizer(resolve(entry.huggingface_id, entry.revision), entry.tokenizer_id)
    buckets = [int(x) for x in args.buckets.split(",")] if args.buckets else cfg.training.length_buckets
    rows = [measure(cfg, tok, kind, buckets) for kind in ("concatenated", "shared_prompt", "packed", "packed_shared_prompt")]
    for r in rows:
        print(json.dumps(r))
    c, s = rows[:2]
    print(json.dumps({
        "real_token_ratio shared_prompt/concatenated": round(s["real_tokens"] / c["real_tokens"], 4),
        "grid_token_ratio shared_prompt/concatenated": round(s["grid_tokens"] / c["grid_tokens"], 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
