"""Summarise a jax profiler trace: device time per kernel and per XLA op, grouped by kind.

    python scripts/profile_summary.py TRACE_DIR [--top 40] [--json OUT]

TRACE_DIR is what `jax.profiler.trace(TRACE_DIR)` wrote (`scripts/bench.py --profile` writes one);
its newest `*.xplane.pb` is read with `jax.profiler.ProfileData` (no TensorBoard, no xprof). For
each device plane (`/device:GPU:0`, ...; the host plane when there is none), it sums event
durations per line ("XLA Ops", "XLA Modules", the streams' kernels) and per event name, and
groups kernel names into kinds (matmul, attention, fusion, copy/collective, other) by substring.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

KINDS = (  # first match wins; kernel names as cuBLAS/CUTLASS/Triton/Mosaic/XLA name them
    ("attention", ("attention", "flash", "mosaic", "splash", "fmha", "sdpa")),
    ("matmul", ("gemm", "cutlass", "cublas", "xmma", "sm90", "sm80", "triton_gemm", "dot", "matmul")),
    ("copy/collective", ("memcpy", "memset", "copy", "all-reduce", "all_gather", "nccl", "transpose")),
    ("reduction", ("reduce", "scatter", "gather", "sort")),
    ("fusion", ("fusion", "loop_", "input_", "triton")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def newest_xplane(root: Path) -> Path:
    found = sorted(root.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"profile_summary: no *.xplane.pb under {root}")
    return found[-1]


def summarise(root: Path, top: int = 40) -> dict:
    from jax.profiler import ProfileData

    path = newest_xplane(root)
    data = ProfileData.from_file(str(path))
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    if not planes:
        planes = [p for p in data.planes if p.name.startswith("/host:")]
    out = {"xplane": str(path), "planes": []}
    for plane in planes:
        lines = []
        for line in plane.lines:
            per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
            total = 0.0
            for ev in line.events:
                d = float(ev.duration_ns) / 1e6
                per_name[ev.name][0] += d
                per_name[ev.name][1] += 1
                total += d
            if not per_name:
                continue
            kinds: dict[str, float] = defaultdict(float)
            for name, (ms, _) in per_name.items():
                kinds[kind_of(name)] += ms
            ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
            lines.append({
                "line": line.name,
                "total_ms": round(total, 3),
                "events": sum(n for _, n in per_name.values()),
                "by_kind_ms": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                "top": [{"name": n[:160], "ms": round(ms, 3), "count": c} for n, (ms, c) in ranked],
            })
        out["planes"].append({"plane": plane.name, "lines": lines})
    return out


def render(summary: dict, top: int) -> str:
    rows = [f"profile: {summary['xplane']}"]
    for plane in summary["planes"]:
        rows.append(f"== {plane['plane']}")
        for line in plane["lines"]:
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in line["by_kind_ms"].items())
            rows.append(f"-- {line['line']}: {line['total_ms']:.1f} ms in {line['events']} events ({kinds})")
            for e in line["top"][:top]:
                rows.append(f"   {e['ms']:9.3f} ms  x{e['count']:<5d} {e['name']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    s = summarise(Path(args.trace_dir), args.top)
    print(render(s, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
