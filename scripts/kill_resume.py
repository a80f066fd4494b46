"""Kill a training run with SIGKILL at random moments, resume it, and compare with an
uninterrupted run: `python scripts/kill_resume.py --config FILE [--tries N] [--seed S]`.

Kill points cycle through three kinds: a random moment of the run (mostly mid-step or mid-save
with `save_steps: 1`), right after a random checkpoint appeared (the next step or save under way),
and during the final export (once the final checkpoint or the adapter's temporary folder
appeared). Each killed run is continued with `--resume` (again if that is killed too).
Prints how many kills were tried, where they landed, and how many resumed runs gave losses
identical to the uninterrupted run (metrics.jsonl, every logged step) and an identical final
adapter (and value head, for PPO)."""
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
    return [(r["step"], *(r.get(k) for k in LOSSES)) for r in rows if any(k in r for k in LOSSES)]


def _adapter(run: Path):
    """The adapter's tensors (a full fine-tune's: its model/ weights), and PPO's value head where
    the run has one."""
    from safetensors.numpy import load_file
    if (run / "model").is_dir() and not (run / "adapter").is_dir():
        out = {}
        for f in sorted((run / "model").glob("*.safetensors")):
            out.update(load_file(str(f)))
    else:
        out = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    if (run / "value_head.safetensors").is_file():
        out.update({f"value_head.{k}": v for k, v in load_file(str(run / "value_head.safetensors")).items()})
    return out


# What a logged step is compared by: the loss, or PPO's (which logs no `loss`).
LOSSES = ("loss", "loss/policy_avg", "loss/value_avg")


MODES = ("random", "after_checkpoint", "final_export")
# The final export's temporary folder: the adapter's, or a full fine-tune's model.
EXPORT_TMP = (".adapter.jaxpref-tmp-", ".model.jaxpref-tmp-")


def _wait_for(proc, test, deadline: float, poll: float = 0.01) -> bool:
    while time.time() < deadline and proc.poll() is None:
        if test():
            return True
        time.sleep(poll)
    return False


def _steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(c.name) for c in d.iterdir() if c.name.isdigit()) if d.is_dir() else []


def _where(run: Path, total: int) -> str:
    """Where a kill landed, read from what it left behind."""
    if (run / "FINISHED").is_file():
        return "after FINISHED (writing the plot)"
    if any(p.name.startswith(EXPORT_TMP) for p in run.iterdir()) or (run / "adapter").is_dir() or (run / "model").is_dir():
        return "during the final export"
    steps = _steps(run)
    if total in steps:
        return "after the final checkpoint"
    ckpts = run / "checkpoints"
    if ckpts.is_dir() and any("tmp" in c.name for c in ckpts.iterdir()):
        return "mid-save"
    return f"mid-step (after checkpoint {steps[-1] if steps else 0})"


def kill_and_resume(cfg: Path, work: Path, seed: int = 0, tries: int = 5, modes=MODES) -> dict:
    """Kill `tries` live runs (a run that ended before its kill is not counted and is started
    again, up to 3 * tries + 2 starts) and resume each; -> counts and where the kills landed."""
    import yaml
    raw = yaml.safe_load(Path(cfg).read_text())
    name = raw["models"][0].get("name")
    total = int(raw["training"]["max_steps"])
    rng = random.Random(seed)
    ref_out = work / "uninterrupted"
    ref = ref_out / name
    # The uninterrupted run, timed from its first checkpoint to FINISHED: where kills are aimed.
    proc = _train(cfg, ref_out, wait=False)
    _wait_for(proc, lambda: bool(_steps(ref)), time.time() + 900, poll=0.002)
    t_first = time.time()
    _wait_for(proc, lambda: (ref / "FINISHED").is_file(), time.time() + 900, poll=0.002)
    span = max(time.time() - t_first, 0.05)
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {err[-2000:]}")
    identical, killed, landed, k = 0, 0, {}, 0
    while killed < tries and k < 3 * tries + 2:
        mode = modes[killed % len(modes)]
        out = work / f"killed{k}"
        run = out / name
        k += 1
        proc = _train(cfg, out, wait=False)
        deadline = time.time() + 900
        if mode == "random":  # anywhere from the first checkpoint to FINISHED
            _wait_for(proc, lambda: bool(_steps(run)), deadline, poll=0.002)
            time.sleep(rng.uniform(0.0, 1.0) * span)
        elif mode == "after_checkpoint":  # the next step or save under way
            target = rng.randint(1, total - 1)
            _wait_for(proc, lambda: target in _steps(run), deadline, poll=0.002)
            time.sleep(rng.uniform(0.0, 0.02))
        else:  # the final export (a few ms on a tiny model): kill as it starts
            _wait_for(proc, lambda: run.is_dir() and any(p.name.startswith(EXPORT_TMP)
                                                         for p in run.iterdir()), deadline, poll=0.0005)
            time.sleep(rng.uniform(0.0, 0.002))
        if proc.poll() is not None:
            proc.wait()
            print(f"start {k} ({mode}): the run ended before the kill; not counted", file=sys.stderr, flush=True)
            continue
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed += 1
        where = _where(run, total) if run.is_dir() else "before the run folder"
        landed[where] = landed.get(where, 0) + 1
        try:
            _train(cfg, out, "--resume")
        except RuntimeError as e:
            print(f"kill {killed}: --resume failed: {str(e)[-500:]}", file=sys.stderr)
            continue
        same = _losses(run) == _losses(ref)
        a, b = _adapter(ref), _adapter(run)
        same = same and a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
        identical += int(same)
        print(f"kill {killed}/{tries} ({mode}): {where}; resumed run identical: {same}", file=sys.stderr, flush=True)
    return {"tries": killed, "identical": identical, "landed": landed}


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
    print("landed: " + ", ".join(f"{k} {v}" for k, v in sorted(res["landed"].items())))
    return 0 if res["identical"] == res["tries"] else 1


if __name__ == "__main__":
    sys.exit(main())
