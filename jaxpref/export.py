"""`python -m jaxpref.export --run DIR [--adapter-out D] [--merged-out D] [--overwrite]`: re-export a
finished run (its `config.yaml` and `adapter/`) as a PEFT adapter and/or a merged safetensors model.

An output folder that holds anything but a previous export of ours is refused unless `--overwrite`;
the base model's folder and the run folder never are written."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jaxpref.errors import ConfigError, JaxprefError, check_writable
from jaxpref.lora.merged import save_merged
from jaxpref.lora.peft import ADAPTER_CONFIG, load_adapter, save_adapter
from jaxpref.runtime.outdir import check_replaceable


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxpref.export",
                                 description="Export a finished run's LoRA as a PEFT adapter and/or a merged model.")
    ap.add_argument("--run", required=True, help="run directory (holds config.yaml and adapter/)")
    ap.add_argument("--adapter-out", help="write the PEFT adapter folder here")
    ap.add_argument("--merged-out", help="write a merged Hugging Face model here")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an output folder that holds other files (never the base model's or the run's)")
    args = ap.parse_args(argv)
    try:
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
    from jaxpref.models import weights
    from jaxpref.models.source import load_tokenizer, resolve

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {run}: no config.yaml (not a jaxpref run directory)")
    if not (run / "adapter" / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"--run {run}: no adapter/ (the run has not finished or was a full fine-tune)")
    if not args.adapter_out and not args.merged_out:
        raise ConfigError("nothing to do: give --adapter-out and/or --merged-out")
    if args.adapter_out and args.merged_out and _same(args.adapter_out, args.merged_out):
        raise ConfigError(f"--adapter-out and --merged-out are the same folder ({args.adapter_out}); give two")
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
            check_replaceable(Path(out), flag, args.overwrite, "--overwrite", protect)
    bundle = weights.build(src)
    tok = load_tokenizer(src, entry.tokenizer_id)
    params = weights.load_params(bundle)
    lora, spec = load_adapter(run / "adapter", bundle, params)
    if args.adapter_out:
        save_adapter(Path(args.adapter_out), bundle, lora, spec, entry.huggingface_id, tok, overwrite=args.overwrite)
        print(f"adapter -> {args.adapter_out}")
    if args.merged_out:
        save_merged(Path(args.merged_out), bundle, params, lora, spec, tok, overwrite=args.overwrite)
        print(f"merged model -> {args.merged_out}")
    return 0


def _same(a: str, b: str) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


if __name__ == "__main__":
    from jaxpref.runtime.host_memory import tune_malloc
    from jaxpref.runtime.no_torch import hide_torch

    hide_torch()  # jaxpref never uses torch; transformers would import it (~490 MB)
    tune_malloc()  # before any XLA computation (opt-in: JAXPREF_MALLOC_TUNING=1)
    sys.exit(main())
