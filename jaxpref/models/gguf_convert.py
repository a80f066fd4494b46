"""GGUF -> a cached Hugging Face-style directory (config.json, model.safetensors fp32, tokenizer).

The tensors are dequantised with the `gguf` package (every type it reads: F32/F16/BF16, Q4_0 to
Q8_0, the K-quants Q2_K to Q6_K, ...). llama.cpp permutes the rows of Llama's q_proj and k_proj for
its rotary layout, and stores Gemma's RMSNorm weights plus one (its norm multiplies by the weight,
Gemma's by 1 + weight); both are undone here. A Gemma GGUF without a chat template (those
converted from Google's base checkpoints) gets Gemma's (`chat_templates/gemma.jinja`, Google's
Gemma 3 template: `<start_of_turn>user ... <end_of_turn>`). Qwen3-MoE's and Mixtral's stacked
expert tensors are split into the per-expert tensors of their checkpoints (Mixtral's files say
`llama`: a `llama` file with expert tensors is read as `mixtral`); a mixture of experts under any
other architecture is refused. The config and tokenizer are read by transformers' own GGUF support
(for a kind of `OWN_CONFIGS`, whose config transformers does not read, the config comes from that
table, and the tokenizer from transformers' tokenizer of its model type where transformers reads
no config of the file's architecture at all), which imports torch: in a process that hides torch (the jaxpref
command lines, jaxpref/runtime/no_torch.py) the conversion runs in a child Python. Conversion happens once;
later runs read the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxpref.errors import ModelSourceError
from jaxpref.runtime.no_torch import torch_hidden

# GGUF tensor name -> Hugging Face name (Llama-style architectures; Qwen3's q/k norms). OLMo 2
# and Phi-3 are not here: transformers reads no OLMo 2 GGUF config, and its Phi-3 GGUF config
# drops the rotary width (Phi-4-mini), the LongRoPE factors (GGUF tensors) and the window.
_GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{}.self_attn.q_proj.{}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{}.self_attn.k_proj.{}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{}.self_attn.v_proj.{}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{}.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{}.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{}.self_attn.k_norm.weight"),
    # Qwen3-MoE: the router, and the experts stacked [E, out, in], split into one tensor per expert.
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", "model.layers.{}.mlp.gate.weight"),
    (r"blk\.(\d+)\.ffn_gate_exps\.weight", "model.layers.{}.mlp.experts.{{e}}.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up_exps\.weight", "model.layers.{}.mlp.experts.{{e}}.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down_exps\.weight", "model.layers.{}.mlp.experts.{{e}}.down_proj.weight"),
]
# Expert tensors: stacked (`_exps`) or one per expert (`ffn_gate.3`, older Mixtral files), and routers.
_EXPERT_TENSOR = re.compile(r"blk\.\d+\.ffn_(gate_inp|(gate|up|down)(_exps|\.\d+))\.weight")
# Gemma 2/3: a norm before and after each sublayer; llama.cpp's `ffn_norm` is the one before the MLP.
_PRE_POST_NORMS = [
    (r"blk\.(\d+)\.post_attention_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", "model.layers.{}.post_feedforward_layernorm.weight"),
]
# Mixtral: the router and the experts, stacked [E, out, in] (`_exps`) or one tensor per expert (older files).
_MIXTRAL_NAMES = [(r"blk\.(\d+)\.ffn_gate_inp\.weight", "model.layers.{}.block_sparse_moe.gate.weight")] + [
    (rf"blk\.(\d+)\.ffn_{ours}_exps\.weight", f"model.layers.{{}}.block_sparse_moe.experts.{{{{e}}}}.{hf}.weight")
    for ours, hf in (("gate", "w1"), ("up", "w3"), ("down", "w2"))] + [
    (rf"blk\.(\d+)\.ffn_{ours}\.(\d+)\.weight", f"model.layers.{{}}.block_sparse_moe.experts.{{}}.{hf}.weight")
    for ours, hf in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
_ARCH_NAMES = {"gemma2": _PRE_POST_NORMS, "gemma3": _PRE_POST_NORMS, "mixtral": _MIXTRAL_NAMES}  # before _GGUF_NAMES
# Kinds (`_kind`) whose GGUF config transformers does not read: the model type, and the config's
# attributes from the file's `{arch}.` keys (keys of one attribute must agree); the vocabulary size
# and the special token ids (`_TOKEN_IDS`) come from the tokenizer's keys. A key not in the file
# keeps the config class's default; a key of `_REQUIRED` missing is refused.
_LLAMA_KEYS = {
    "block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "attention.value_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta"}
OWN_CONFIGS = {
    "gemma": ("gemma", _LLAMA_KEYS),
    # Mixtral's `feed_forward_length` is its expert width (llama.cpp writes no other, or the same).
    "mixtral": ("mixtral", {**_LLAMA_KEYS, "expert_feed_forward_length": "intermediate_size",
                            "expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok",
                            "attention.sliding_window": "sliding_window"}),
}
_REQUIRED = {"mixtral": ("expert_count", "expert_used_count")}
_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}
GEMMA = ("gemma", "gemma2", "gemma3")  # RMSNorm weights stored plus one; Gemma's chat template
MOE = ("qwen3moe",)
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3") + GEMMA + MOE
PERMUTED = ("llama", "mixtral")  # kinds whose q/k rows llama.cpp permutes
GEMMA_TEMPLATE = Path(__file__).with_name("chat_templates") / "gemma.jinja"
PROGRESS_FD = "JAXPREF_PROGRESS_FD"  # the child's descriptor for its bar (the parent's terminal)
CONVERTER_VERSION = 4  # part of the cache key: a fixed converter never reuses an old conversion


def _hf_name(name: str, kind: str) -> str | None:
    for pat, out in _ARCH_NAMES.get(kind, []) + _GGUF_NAMES:
        m = re.fullmatch(pat, name)
        if m:
            return out.format(*m.groups())
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rotary layout interleaves the two halves of each
    head: rows [n_head, d/2, 2] back to HF's [n_head, 2, d/2])."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cache_dir(path: Path, cache_root: Path) -> Path:
    h = hashlib.sha256()
    h.update(f"converter-v{CONVERTER_VERSION}|".encode())
    h.update(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return cache_root / "gguf" / f"{path.stem}-{h.hexdigest()[:12]}"


def gguf_metadata(path: Path, cache_root: Path) -> Path:
    """Config and tokenizer of a GGUF without dequantising its tensors (for --dry-run)."""
    out = _cache_dir(path, cache_root)
    if (out / "config.json").is_file():
        return out
    if torch_hidden():
        _in_child("metadata", path, cache_root)
        return out
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelSourceError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}".splitlines()[0])
    _check_architecture(reader, path)
    try:
        cfg = _config(_base_config(path, reader), reader)
        tok = _tokenizer(path, reader, cfg)
    except ModelSourceError:
        raise
    except Exception as e:
        raise ModelSourceError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}".splitlines()[0])
    names = {t.name for t in reader.tensors}
    cfg.tie_word_embeddings = "output.weight" not in names
    tmp = out.with_name(out.name + ".meta.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def convert_gguf(path: Path, cache_root: Path) -> Path:
    """The cached conversion of `path`, made the first time: a line says so when it starts and
    when it ends, and in a terminal a bar counts the tensors dequantised."""
    out = _cache_dir(path, cache_root)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    t0 = time.time()
    print(f"jaxpref: converting {path.name} to safetensors, once (cached in {out}) ...", file=sys.stderr, flush=True)
    if torch_hidden():
        _in_child("convert", path, cache_root)
    else:
        _convert(path, cache_root)
    print(f"jaxpref: converted {path.name} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def _bar(tensors: list, name: str):
    """`tensors`, counted by a tqdm bar when a terminal shows it: stderr, or the descriptor of
    its terminal that a parent handed its child (JAXPREF_PROGRESS_FD)."""
    from tqdm import tqdm

    fd = os.environ.get(PROGRESS_FD)
    if not fd and not sys.stderr.isatty():
        return tensors
    stream = os.fdopen(int(fd), "w", closefd=False) if fd else sys.stderr
    return tqdm(tensors, desc=f"converting {name}", unit="tensor", file=stream, leave=False,
                mininterval=0, miniters=1)  # every tensor drawn: a large one takes seconds


def _convert(path: Path, cache_root: Path) -> Path:
    out = _cache_dir(path, cache_root)
    import gguf
    from safetensors.numpy import save_file

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelSourceError(f"cannot read GGUF file {path}: {e}")
    kind = _check_architecture(reader, path)
    cfg = _config(_base_config(path, reader), reader)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for t in _bar(list(reader.tensors), path.name):
        name = _hf_name(t.name, kind)
        if name is None:
            continue
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if "{e}" in name:
            tensors.update({name.format(e=e): np.ascontiguousarray(x) for e, x in enumerate(w)})
            continue
        if kind in GEMMA and name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        elif kind in PERMUTED and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w, cfg.num_attention_heads)
        elif kind in PERMUTED and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w, cfg.num_key_value_heads)
        tensors[name] = np.ascontiguousarray(w)
    cfg.tie_word_embeddings = "lm_head.weight" not in tensors
    cfg.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"))
    del tensors
    _tokenizer(path, reader, cfg).save_pretrained(tmp)
    (tmp / "jaxpref_source.json").write_text(json.dumps({"gguf": path.name}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _kind(reader) -> str:
    """What jaxpref reads a GGUF as: its `general.architecture`, except `mixtral` for a `llama`
    file with expert tensors (llama.cpp writes Mixtral so)."""
    arch = str(reader.fields["general.architecture"].contents())
    if arch == "llama" and any(_EXPERT_TENSOR.fullmatch(t.name) for t in reader.tensors):
        return "mixtral"
    return arch


def _check_architecture(reader, path: Path) -> str:
    """The GGUF's kind (`_kind`), if jaxpref reads it (one line naming the file otherwise)."""
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in SUPPORTED:
        raise ModelSourceError(f"GGUF {path.name}: architecture `{arch}` is not supported "
                               f"(supported: {', '.join(SUPPORTED)})")
    kind = _kind(reader)
    experts = next((t.name for t in reader.tensors if _EXPERT_TENSOR.fullmatch(t.name)), None)
    if experts and kind not in MOE + ("mixtral",):
        raise ModelSourceError(f"GGUF {path.name}: a mixture of experts (`{experts}`) under architecture "
                               f"`{arch}` is not supported (only under `llama`, as Mixtral, and `qwen3moe`)")
    missing = [f"{arch}.{key}" for key in _REQUIRED.get(kind, ()) if f"{arch}.{key}" not in reader.fields]
    if missing:
        raise ModelSourceError(f"GGUF {path.name}: a `{arch}` file with expert tensors ({kind}) lacks "
                               f"`{missing[0]}`")
    return kind


def _base_config(path: Path, reader):
    """transformers' config of a GGUF, or for a kind of `OWN_CONFIGS` the one its table makes of
    the file's metadata."""
    from transformers import AutoConfig

    arch, kind = str(reader.fields["general.architecture"].contents()), _kind(reader)
    if kind not in OWN_CONFIGS:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model_type, keys = OWN_CONFIGS[kind]
    settings = {}
    for key, attr in keys.items():
        if f"{arch}.{key}" in reader.fields:
            value = reader.fields[f"{arch}.{key}"].contents()
            if settings.setdefault(attr, value) != value:
                raise ModelSourceError(f"GGUF {path.name}: `{arch}.{key}` ({value}) differs from another key "
                                       f"read as `{attr}` ({settings[attr]})")
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelSourceError(f"GGUF {path.name}: no vocabulary (`tokenizer.ggml.tokens`)")
    settings["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    settings.update({attr: int(reader.fields[f"tokenizer.ggml.{key}"].contents())
                     for key, attr in _TOKEN_IDS.items() if f"tokenizer.ggml.{key}" in reader.fields})
    return AutoConfig.for_model(model_type, **settings)


def _config(cfg, reader):
    """transformers' config of a GGUF, with what it leaves out: Qwen3-MoE's expert width
    (transformers keeps its default, 768); the soft-caps llama.cpp writes for Gemma 2 (transformers
    takes its defaults); Gemma 3's linear RoPE scaling of the global layers (4B and larger); and
    Gemma 2 27B's score scale, which llama.cpp decides by the layer count (46): 1/sqrt(hidden /
    heads) there, 1/sqrt(head_dim) elsewhere."""
    arch = str(reader.fields["general.architecture"].contents())
    field = lambda key: reader.fields[f"{arch}.{key}"].contents() if f"{arch}.{key}" in reader.fields else None
    if arch == "qwen3moe" and field("expert_feed_forward_length") is not None:
        cfg.moe_intermediate_size = int(field("expert_feed_forward_length"))
    if arch not in GEMMA:
        return cfg
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if field(key) is not None:
            setattr(cfg, key, float(field(key)))
    if arch == "gemma2" and cfg.num_hidden_layers == 46:
        cfg.query_pre_attn_scalar = cfg.hidden_size // cfg.num_attention_heads
    factor = field("rope.scaling.factor")
    if arch == "gemma3" and str(field("rope.scaling.type")) == "linear" and factor not in (None, 1.0):
        cfg.rope_parameters["full_attention"].update(rope_type="linear", factor=float(factor))
    return cfg


def _tokenizer(path: Path, reader, cfg):
    """transformers' tokenizer of a GGUF (for an architecture of `OWN_CONFIGS`, the tokenizer of
    its model type, which transformers' AutoTokenizer would otherwise look up in the config it
    cannot read; a Mixtral file's is that of its architecture, `llama`), with Gemma's chat
    template where a Gemma GGUF has none."""
    import transformers
    from transformers import AutoTokenizer

    arch = str(reader.fields["general.architecture"].contents())
    own = {"tokenizer_type": cfg.model_type} if arch in OWN_CONFIGS else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **own)
    except ValueError as e:   # e.g. transformers 5.17 builds no `gemma` GGUF tokenizer
        raise ModelSourceError(f"GGUF {path.name}: transformers {transformers.__version__} cannot build the "
                               f"tokenizer of a `{arch}` file ({e}); a newer transformers (5.23) can") from None
    for key in ("bos_token_id", "eos_token_id"):   # transformers 5.17 makes a `llama` file's BOS its EOS too
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None and getattr(tok, key) != int(field.contents()):
            setattr(tok, key.removesuffix("_id"), tok.convert_ids_to_tokens(int(field.contents())))
    if arch in GEMMA and "tokenizer.chat_template" not in reader.fields and not tok.chat_template:
        tok.chat_template = GEMMA_TEMPLATE.read_text(encoding="utf-8")
    return tok


def _in_child(step: str, path: Path, cache_root: Path) -> None:
    """Run `gguf_metadata` or `_convert` ("metadata", "convert") in a fresh Python, where
    transformers' GGUF reader can import torch; the conversion's memory leaves with the child."""
    cmd = [sys.executable, "-m", "jaxpref.models.gguf_convert", step, str(path), str(cache_root)]
    env, fds = dict(os.environ), ()
    if step == "convert" and sys.stderr.isatty():  # the child draws its bar on our terminal
        fds = (os.dup(sys.stderr.fileno()),)
        env[PROGRESS_FD] = str(fds[0])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise ModelSourceError(lines[-1] if lines else f"GGUF conversion of {path} failed (exit {proc.returncode})")


if __name__ == "__main__":  # python -m jaxpref.models.gguf_convert {metadata,convert} GGUF CACHE_ROOT
    step = {"metadata": gguf_metadata, "convert": _convert}[sys.argv[1]]
    try:
        print(step(Path(sys.argv[2]), Path(sys.argv[3])))
    except ModelSourceError as e:
        sys.exit(str(e))
