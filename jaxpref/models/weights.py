"""Build our Flax model for a source and read its weights into the parameter tree.

Tensors stream one at a time (safetensors `safe_open`) into preallocated host buffers of the
target dtype; each finished leaf moves to the device (with its sharding) and its host buffer is
dropped, so peak host memory stays near one copy of the model.
PyTorch pickles (`*.bin`, `*.pt`) are never unpickled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpref.errors import ModelSourceError
from jaxpref.models import Architecture, get_architecture
from jaxpref.models.moe import MoESpec, load_balancing_loss
from jaxpref.models.source import ModelSource
from jaxpref.models.rope_config import KINDS
from jaxpref.models.tied import check_tied_head
from jaxpref.models.spec import split_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class ModelBundle:
    """Everything the trainer needs to run one architecture."""
    source: ModelSource
    arch: Architecture
    args: Any        # the architecture's frozen args dataclass
    module: Any      # flax.linen Module

    def with_args(self, **changes) -> "ModelBundle":
        args = replace(self.args, **changes)
        return ModelBundle(self.source, self.arch, args, self.arch.model_cls(args))

    def runtime_params(self, params: dict) -> dict:
        """The base tree as the step should receive it: with `scan_layers` off, one tree per layer,
        split once outside jit (a slice of a stacked weight inside the step is a copy per call).
        The stacked tree given is consumed: use only the returned one."""
        return params if self.args.scan_layers else split_layers(params, self.args.num_layers, consume=True)

    def hidden(self, params, lora, input_ids, positions, mask, rngs=None, router_aux: bool = False, cache=None):
        """Final hidden states [B, T, D]; `lora=None` is the reference (adapter off). Stacked or
        split layer trees are both accepted; the stacked LoRA is split inside the step.
        `router_aux` (mixtures of experts): (hidden, the load-balancing loss of this forward, a
        float32 scalar over the tokens TRL counts, `moe.load_balancing_loss`). With a generation
        `cache` (`kv_cache.KVCache`): (hidden, the updated cache)."""
        if not self.args.scan_layers:
            params = split_layers(params, self.args.num_layers)
            lora = None if lora is None else split_layers(lora, self.args.num_layers)
        variables = {"params": params} if lora is None else {"params": params, "lora": lora}
        if cache is not None:
            return self.module.apply(variables, input_ids, positions, mask, cache, rngs=rngs)
        if router_aux:
            hidden, state = self.module.apply(variables, input_ids, positions, mask, rngs=rngs, mutable=["aux"])
            return hidden, load_balancing_loss(state.get("aux", {}), self.moe.num_experts)
        return self.module.apply(variables, input_ids, positions, mask, rngs=rngs)

    @property
    def moe(self) -> MoESpec | None:
        """The mixture-of-experts sublayer's spec, None for a dense model."""
        mlp = self.args.spec().mlp
        return mlp if isinstance(mlp, MoESpec) else None

    @property
    def router_aux_coef(self) -> float:
        """A mixture of experts' `router_aux_loss_coef` (the training loss adds it times the
        load-balancing loss, as TRL); 0 for a dense model."""
        return float(getattr(self.args, "router_aux_loss_coef", 0.0)) if self.moe is not None else 0.0

    def head(self, params) -> jax.Array:
        """LM head [D, V]."""
        return self.arch.head_weight(params, self.args)

    def abstract_params(self) -> dict:
        """The parameter tree as ShapeDtypeStructs, without reading or allocating weights."""
        from jaxpref.models.attention import MaskInfo

        ids = jnp.zeros((1, 2), jnp.int32)
        mask = MaskInfo.rows(jnp.ones((1, 2), jnp.int32))
        # The stacked tree; traced for shapes only, so through XLA attention whatever the backend.
        module = self.arch.model_cls(replace(self.args, scan_layers=True, attention="xla"))
        return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids, mask))["params"]


def build(source: ModelSource, param_dtype: str = "float32", compute_dtype: str = "float32",
          **options) -> ModelBundle:
    arch = get_architecture(source.model_type, f"model `{source.spec}`: ")
    try:
        args = arch.args_cls.from_hf(source.hf_config, dtype=DTYPES[compute_dtype],
                                     param_dtype=DTYPES[param_dtype], **options)
    except KeyError as e:
        raise ModelSourceError(f"model `{source.spec}`: config.json lacks {e}")
    except ModelSourceError as e:
        raise ModelSourceError(f"model `{source.spec}`: {e}")
    check_spec(args, source)
    return ModelBundle(source, arch, args, arch.model_cls(args))


def check_spec(args, source: ModelSource) -> None:
    """config.json values the decoder cannot run, named by key before any tracing (they would
    fail deep inside the forward, or in transformers' config check blamed on the tokenizer)."""
    from jaxpref.models.layers import ACTIVATIONS

    where = f"model `{source.spec}`: {source.path / 'config.json'}"
    hf, spec = source.hf_config, args.spec()
    if args.num_heads % spec.attn.kv_heads:
        raise ModelSourceError(f"{where}: `num_attention_heads` ({args.num_heads}) is not a multiple of "
                               f"`num_key_value_heads` ({spec.attn.kv_heads})")
    if not hf.get("head_dim") and isinstance(hf.get("hidden_size"), int) and hf["hidden_size"] % args.num_heads:
        raise ModelSourceError(f"{where}: `hidden_size` ({hf['hidden_size']}) is not a multiple of "
                               f"`num_attention_heads` ({args.num_heads}), and no `head_dim` is given")
    act = spec.mlp.activation
    if act not in ACTIVATIONS:
        key = next((k for k in ("hidden_act", "hidden_activation", "activation_function") if hf.get(k) == act),
                   "hidden_act")
        raise ModelSourceError(f"{where}: `{key}: {act}` is not supported; supported: {', '.join(ACTIVATIONS)}")
    for rope in (spec.rope, getattr(spec, "local_rope", None)):
        scaling = dict(rope.scaling) if rope is not None and rope.scaling else {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in KINDS:
            raise ModelSourceError(f"{where}: rope scaling `{kind}` (`rope_scaling.rope_type`) is not "
                                   f"supported; supported: {', '.join(KINDS)}")


def weight_files(path: Path, spec: str) -> tuple[str, list[Path]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        import json
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8, shape of it
            raise ModelSourceError(f"model `{spec}`: {index} is not a safetensors index with a `weight_map` "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        missing = [n for n in names if not isinstance(n, str) or not (path / n).is_file()]
        if missing:
            raise ModelSourceError(f"model `{spec}`: {index.name} names `{missing[0]}`, which is not in {path}")
        return "safetensors", [path / n for n in names]
    st = sorted(path.glob("*.safetensors"))
    st = [f for f in st if not f.name.startswith("adapter_")]
    if st:
        return "safetensors", st
    if (path / "flax_model.msgpack").is_file():
        return "msgpack", [path / "flax_model.msgpack"]
    found = sorted(p.name for p in path.iterdir() if p.is_file())
    pickles = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ModelSourceError(
            f"model `{spec}`: only PyTorch pickle weights ({', '.join(pickles[:3])}), which jaxpref "
            "never unpickles; convert them to safetensors (model.save_pretrained(dir, safe_serialization=True))")
    raise ModelSourceError(f"model `{spec}`: no readable weights (found: {', '.join(found) or 'nothing'})")


# Base-model prefixes of the PyTorch names, and top-level keys that identify a bare base model
# (a checkpoint saved from e.g. FlaxGPT2Model rather than FlaxGPT2LMHeadModel).
_BASE_PREFIXES = ("model", "transformer", "gpt_neox")
_BARE_MARKERS = (("embed_in", "gpt_neox"), ("wte", "transformer"), ("h", "transformer"),
                 ("embed_tokens", "model"), ("layers", "model"))
_HEADS = ("lm_head", "embed_out")


def _iter_msgpack(file: Path) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Old HF Flax checkpoints: nested by module name. Yields PyTorch names and layouts.

    Flax stores every 2-D `kernel` as the transposed PyTorch weight (Dense [in, out]; GPT-2's
    FlaxConv1D [out, in]), `embedding` for embeddings and `scale` (or `weight`) for norms.
    """
    from flax.serialization import msgpack_restore

    tree = msgpack_restore(file.read_bytes())
    if not isinstance(tree, dict):
        raise ModelSourceError(f"{file}: not a Flax parameter tree")
    if "params" in tree and len(tree) == 1:  # saved as {"params": ...}
        tree = tree["params"]
    top = set(tree)
    prefix = ""
    if not top & set(_BASE_PREFIXES):
        prefix = next((p + "." for key, p in _BARE_MARKERS if key in top), "")
    flat = traverse_util.flatten_dict(tree)
    del tree
    for parts, value in flat.items():
        parts = [str(p) for p in parts]
        leaf = parts[-1]
        transpose = False
        if leaf == "kernel":
            parts[-1] = "weight"
            transpose = np.ndim(value) == 2
        elif leaf in ("embedding", "scale"):
            parts[-1] = "weight"
        pt = ".".join(parts)
        if prefix and parts[0] not in _HEADS:
            pt = prefix + pt
        yield pt, (lambda v=value, t=transpose: np.asarray(v).T if t else np.asarray(v))


def _compile_rules(arch: Architecture):
    rules = []
    for r in arch.weights:
        pat = re.escape(r.hf_name).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{e}"), r"(?P<e>\d+)")
        rules.append((re.compile(pat + "$"), r))
    return rules


def _slot(rule, index: tuple[int, ...], target) -> tuple[tuple, tuple[int, ...], int]:
    """Where a tensor of `rule` goes in its leaf: (buffer index, the tensor's expected shape,
    units that fill the leaf). `index`: its layer (and expert); `part` selects a share of the
    leaf's last axis."""
    p, count = rule.part
    body = target.shape[len(index):]
    width = body[-1] // count if body else 0
    where = index if count == 1 else index + (Ellipsis, slice(p * width, (p + 1) * width))
    want = tuple(body[:-1]) + (width,) if count > 1 else tuple(body)
    return where, want, int(np.prod(target.shape[:len(index)], dtype=np.int64)) * count


def _lost_name(rules, path: tuple, target, have: set) -> str:
    """The checkpoint name of one missing piece of leaf `path` (`have`: the pieces read)."""
    mine = [r for r in rules if r.path == path]
    if not mine:
        return "/".join(path)
    if not mine[0].stacked and not mine[0].expert:
        return mine[0].hf_name
    lead = target.shape[:int(mine[0].stacked) + int(mine[0].expert)]
    for pos in np.ndindex(*lead):
        for r in mine:
            if pos + (r.part[0],) not in have:
                return r.hf_name.format(**dict(zip(("i", "e") if r.stacked else ("e",), pos)))
    return mine[0].hf_name


# safetensors dtype names -> numpy (bf16 and fp8 through ml_dtypes, which jax ships).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
              "F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(files: list[Path], headers_only: bool = False) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """Each safetensors tensor is read with a plain file read, not through
    safetensors' mmap: mapped pages of the file stay resident and count in our RSS until the file
    is closed, one more copy of the model at peak. Read pages go to the page cache instead."""
    import json
    import struct

    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= f.stat().st_size - 8:
                raise ModelSourceError(f"{f}: not a safetensors file (bad header length)")
            try:
                header = json.loads(fh.read(n))
                if not isinstance(header, dict):
                    raise ValueError("not a mapping")
            except (ValueError, UnicodeDecodeError) as e:
                raise ModelSourceError(f"{f}: not a safetensors file (unreadable header: {e})")
            header.pop("__metadata__", None)
            base = 8 + n
            try:
                end = max((int(i["data_offsets"][1]) for i in header.values()), default=0)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise ModelSourceError(f"{f}: not a safetensors file (unreadable header: {type(e).__name__})")
            if base + end > f.stat().st_size:  # the header knows the size; the dry run reads no data
                raise ModelSourceError(f"{f}: file is truncated (its header describes {base + end} bytes, "
                                       f"the file has {f.stat().st_size})")

            def get(info, fh=fh, base=base, f=f):
                begin, end = info["data_offsets"]
                if info["dtype"] not in _ST_DTYPES:
                    raise ModelSourceError(f"{f.name}: unsupported safetensors dtype {info['dtype']}")
                dtype = np.dtype(_ST_DTYPES[info["dtype"]])
                raw = _aligned_empty((end - begin,), np.uint8)
                fh.seek(base + begin)
                if fh.readinto(memoryview(raw)) != end - begin:
                    raise ModelSourceError(f"{f.name}: file is truncated")
                return raw.view(dtype).reshape(info["shape"])

            # file order, so that the reads go forward through the file
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if headers_only:  # a zero-byte stand-in with the tensor's shape (dry run)
                    yield name, (lambda info=info: np.broadcast_to(np.zeros((), np.uint8), info["shape"]))
                else:
                    yield name, (lambda info=info: get(info))


def read_tensor(source: ModelSource, name: str) -> np.ndarray | None:
    """One tensor of a safetensors checkpoint, by its name, read alone (None when absent or when
    the weights are not safetensors)."""
    kind, files = weight_files(source.path, source.spec)
    if kind == "safetensors":
        for found, get in _read_safetensors(files):
            if found == name:
                return get()
    return None


def check_weights(bundle: ModelBundle) -> None:
    """What `load_params` checks (every tensor present, named as this architecture expects, with
    the right shape), from the safetensors headers alone: no weight value is read (dry run)."""
    load_params(bundle, headers_only=True)


def load_params(bundle: ModelBundle, shardings: Any = None, headers_only: bool = False) -> dict | None:
    """Read the checkpoint into our parameter tree (param dtype, optional shardings tree).
    `headers_only`: check names and shapes only, for safetensors from their headers (returns None)."""
    spec = bundle.source.spec
    kind, files = weight_files(bundle.source.path, spec)
    abstract = traverse_util.flatten_dict(bundle.abstract_params())
    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    rules = _compile_rules(bundle.arch)
    ignored = [re.compile(p + "$") for p in bundle.arch.ignored]
    buffers: dict[tuple, np.ndarray] = {}
    filled: dict[tuple, set] = {}
    out: dict[tuple, jax.Array] = {}
    np_dtype = np.dtype(jnp.dtype(bundle.args.param_dtype))

    stray_head = None
    it = _read_safetensors(files, headers_only) if kind == "safetensors" else _iter_msgpack(files[0])
    for name, get in it:
        match = None
        for pat, rule in rules:
            m = pat.match(name)
            if m:
                match = (rule, tuple(int(m.group(g)) for g in ("i", "e") if g in m.groupdict()))
                break
        if match is None:
            if any(p.match(name) for p in ignored):
                continue
            raise ModelSourceError(f"model `{spec}`: unexpected tensor `{name}` for {bundle.source.model_type}")
        rule, index = match
        if rule.path not in abstract:
            if rule.optional_if_tied:   # an lm_head saved next to tied embeddings: checked below
                if not headers_only:
                    stray_head = (name, get())
                continue
            raise ModelSourceError(f"model `{spec}`: unexpected tensor `{name}` (not in this configuration)")
        target = abstract[rule.path]
        where, want, units = _slot(rule, index, target)
        arr = get()
        if rule.transpose:
            arr = arr.T
        if tuple(arr.shape) != want:
            raise ModelSourceError(f"model `{spec}`: tensor `{name}` has shape {tuple(arr.shape)}, expected {want}")
        if index:
            for i, n, what in zip(index, target.shape, ("num_hidden_layers", "experts")):
                if i >= n:
                    raise ModelSourceError(f"model `{spec}`: tensor `{name}` is beyond {what}={n}")
            filled.setdefault(rule.path, set()).add(index + (rule.part[0],))
            if headers_only:
                if len(filled[rule.path]) == units:
                    out[rule.path] = None
                continue
            buf = buffers.get(rule.path)
            if buf is None:
                buf = buffers[rule.path] = _aligned_empty(target.shape, np_dtype)
            buf[where] = arr
            if len(filled[rule.path]) == units:
                out[rule.path] = _to_device(buffers.pop(rule.path), flat_shardings.get(rule.path))
        elif headers_only:
            out[rule.path] = None
        else:  # no copy when the tensor already has the right dtype and layout
            out[rule.path] = _to_device(np.ascontiguousarray(arr, np_dtype), flat_shardings.get(rule.path))
        del arr
    missing = [p for p in abstract if p not in out]
    if missing:
        lost = _lost_name(bundle.arch.weights, missing[0], abstract[missing[0]], filled.get(missing[0], set()))
        raise ModelSourceError(f"model `{spec}`: checkpoint lacks tensor `{lost}`"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if stray_head is not None:
        check_tied_head(bundle.source.spec, stray_head, np.asarray(out[(bundle.args.spec().embed,)]), np_dtype)
    return None if headers_only else traverse_util.unflatten_dict(out)


def _to_device(arr: np.ndarray, sharding) -> jax.Array:
    """`device_put` (not `jnp.asarray`, which always copies): on CPU it adopts a 64-byte aligned
    host buffer without a copy. The loader drops its own reference to `arr` right after."""
    if sharding is not None:
        return jax.device_put(arr, sharding)
    return jax.device_put(arr)


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty aligned to 64 bytes, the alignment XLA's CPU client needs to use it in place."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off:off + nbytes].view(dtype).reshape(shape)
