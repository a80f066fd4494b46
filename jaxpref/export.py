"""`python -m jaxpref.export --run DIR [--adapter-out D] [--merged-out D] [--dtype T] [--push-to-hub REPO]
[--overwrite]`: re-export a finished run (its `config.yaml` and `adapter/`) as a PEFT adapter and/or
a merged safetensors model, each with a model card (README.md), and upload one to the Hugging Face
Hub.

An output folder that holds anything but a previous export of ours is refused unless `--overwrite`;
the base model's folder and the run folder never are written."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxpref.errors import ConfigError, JaxprefError, check_writable
from jaxpref.runtime.env import load_dotenv
from jaxpref.lora.merged import DTYPES, save_merged
from jaxpref.lora.peft import ADAPTER_CONFIG, load_adapter, save_adapter
from jaxpref.runtime.outdir import MANIFEST, check_replaceable


def parse_args(argv, prog: str):
    ap = argparse.ArgumentParser(prog=prog, description="Export a finished run's LoRA as a PEFT adapter and/or "
                                                        "a merged model, and upload one to the Hugging Face Hub.")
    ap.add_argument("--run", required=True, help="run directory (holds config.yaml and adapter/)")
    ap.add_argument("--adapter-out", type=os.path.expanduser, help="write the PEFT adapter folder here")
    ap.add_argument("--merged-out", type=os.path.expanduser, help="write a merged Hugging Face model here")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="the merged model's weights (default: the source's dtype; float32 for a GGUF)")
    ap.add_argument("--push-to-hub", metavar="REPO_ID",
                    help="upload the merged model (with --merged-out), else the adapter, to this Hub repo")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an output folder that holds other files (never the base model's or the run's)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m jaxpref.export") -> int:
    args = parse_args(argv, prog)
    try:
        load_dotenv()   # HF_TOKEN for --push-to-hub
        return _export(args)
    except JaxprefError as e:
        print(f"jaxpref.export: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, a folder that cannot be written: the output was left as it was
        from jaxpref.errors import os_error_line
        line = os_error_line(e)
        if line is None:
            raise
        print(f"jaxpref.export: error: {line}; nothing was replaced", file=sys.stderr)
        return 2


def _export(args) -> int:
    from jaxpref.config import load_config
    from jaxpref.lora.card import base_model_name, model_card
    from jaxpref.models import weights
    from jaxpref.models.source import load_tokenizer, resolve

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {run}: no config.yaml (not a jaxpref run directory)")
    if not (run / "adapter" / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"--run {run}: no adapter/ (the run has not finished or was a full fine-tune)")
    if not args.adapter_out and not args.merged_out and not args.push_to_hub:
        raise ConfigError("nothing to do: give --adapter-out, --merged-out and/or --push-to-hub")
    if args.dtype and not args.merged_out:
        raise ConfigError("--dtype is the merged model's: give --merged-out too")
    if args.adapter_out and args.merged_out and _same(args.adapter_out, args.merged_out):
        raise ConfigError(f"--adapter-out and --merged-out are the same folder ({args.adapter_out}); give two")
    if args.push_to_hub:
        _check_hub(args.push_to_hub)
    for flag, out in (("--adapter-out", args.adapter_out), ("--merged-out", args.merged_out)):
        if out:
            check_writable(out, flag, directory=True)
    cfg = load_config(run / "config.yaml")
    entry = cfg.models[0]
    src = resolve(entry.huggingface_id, entry.revision)
    # Before any weight is read: an output that would replace the user's files is refused now.
    protect = {"the base model's folder": src.path, "the run folder": run}
    for flag, out in (("--adapter-out", args.adapter_out), ("--merged-out", args.merged_out)):
        if out:
            check_replaceable(Path(out), flag, args.overwrite, "--overwrite", protect, within={"the run folder": run})
    summary = _summary(run)
    bundle = weights.build(src)
    tok = load_tokenizer(src, entry.tokenizer_id)
    params = weights.load_params(bundle)
    lora, spec = load_adapter(run / "adapter", bundle, params)
    if args.adapter_out:
        save_adapter(Path(args.adapter_out), bundle, lora, spec, base_model_name(src), tok, overwrite=args.overwrite,
                     card=model_card(cfg, 0, summary, "adapter"))
        print(f"adapter -> {args.adapter_out}")
    if args.merged_out:
        save_merged(Path(args.merged_out), bundle, params, lora, spec, tok, overwrite=args.overwrite,
                    dtype=args.dtype, card=model_card(cfg, 0, summary, "merged"))
        print(f"merged model -> {args.merged_out}")
    if args.push_to_hub:
        folder = Path(args.merged_out or args.adapter_out or run / "adapter")
        print(f"{folder} -> {push_to_hub(folder, args.push_to_hub)}")
    return 0


def _summary(run: Path) -> dict:
    """The run's summary.json for the model card; {} when absent, unreadable or not an object."""
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _check_hub(repo_id: str) -> None:
    """Fail before any work when the upload cannot happen: an offline hub, a malformed repo id."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--push-to-hub {repo_id}: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is "
                          "set); export to a folder and upload it later")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"--push-to-hub {repo_id}: not a Hub repo id ({str(e).splitlines()[0]})")


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload `folder` (an export) to the model repo `repo_id`, created if needed. -> its URL."""
    from huggingface_hub import HfApi

    from jaxpref.models.source import hub_token

    try:
        api = HfApi(token=hub_token())
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload with jaxpref", ignore_patterns=[MANIFEST])
    except Exception as e:  # network, authentication, permissions: all one line
        msg = " ".join(str(e).split())[:300]
        raise JaxprefError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {msg}); "
                           f"the export is in {folder}")
    return f"https://huggingface.co/{repo_id}"


def _same(a: str, b: str) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


if __name__ == "__main__":
    from jaxpref.runtime.host_memory import tune_malloc
    from jaxpref.runtime.no_torch import hide_torch

    hide_torch()  # jaxpref never uses torch; transformers would import it (~490 MB)
    tune_malloc()  # before any XLA computation (opt-in: JAXPREF_MALLOC_TUNING=1)
    sys.exit(main())
