"""Kill a training run with SIGKILL at random moments, resume it, and compare with an
uninterrupted run: `python scripts/kill_resume.py --config FILE [--tries N] [--seed S]`.

Prints how many kills were tried and how many resumed runs gave losses identical to the
uninterrupted run (metrics.jsonl, every logged step) and an identical final adapter."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _train(cfg: Path, out: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "jaxpref.train", "--config", str(cfg), "--output-dir", str(out), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if wait:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"training failed ({proc.returncode}): {err[-2000:]}")
    return proc


def _losses(run: Path):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _adapter(run: Path):
    from safetensors.numpy import load_file
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def kill_and_resume(cfg: Path, work: Path, seed: int = 0, tries: int = 5) -> dict:
    import yaml
    name = yaml.safe_load(Path(cfg).read_text())["models"][0].get("name")
    rng = random.Random(seed)
    ref_out = work / "uninterrupted"
    t0 = time.time()
    _train(cfg, ref_out)
    duration = time.time() - t0
    ref = ref_out / name
    identical = 0
    for k in range(tries):
        out = work / f"killed{k}"
        proc = _train(cfg, out, wait=False)
        # Kill somewhere between start-up and the end of training (during steps or a save).
        time.sleep(rng.uniform(0.3, 0.95) * duration)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _train(cfg, out, "--resume")
        run = out / name
        same = _losses(run) == _losses(ref)
        a, b = _adapter(ref), _adapter(run)
        same = same and all(np.array_equal(a[key], b[key]) for key in a)
        identical += int(same)
    return {"tries": tries, "identical": identical}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    import tempfile
    work = Path(args.work or tempfile.mkdtemp(prefix="jaxpref-kill-"))
    res = kill_and_resume(Path(args.config), work, args.seed, args.tries)
    print(f"kills tried: {res['tries']}, resumed runs identical to the uninterrupted one: {res['identical']}")
    return 0 if res["identical"] == res["tries"] else 1


if __name__ == "__main__":
    sys.exit(main())
