"""The device mesh and how arrays are laid out on it.

Axes: `data` (batch), `fsdp` (batch, and the frozen base weights), `tensor` (the large matrices'
output or input features). The batch's row axis is split over data x fsdp; base kernels follow the
architecture's table (column-parallel: in -> fsdp, out -> tensor; row-parallel: the reverse); the
LoRA tree and its optimizer state are small and replicated. A dimension that an axis does not
divide stays whole, so every mesh gives the single-device numbers.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpref.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def init_distributed(gpu_cfg, src: str = "") -> None:
    """Join a multi-process run: `gpu.distributed` settings, or JAX's cluster detection (SLURM,
    TPU pods) when `gpu.distributed: {auto: true}`."""
    d = gpu_cfg.distributed   # a `DistributedConfig`, checked by `config.validate`
    if d is None:
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if not d.auto:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
    timeout = d.timeout_s
    if kwargs and kwargs["process_id"] != 0:
        # XLA aborts the whole process when it cannot reach the coordinator: check first.
        _wait_for_coordinator(kwargs["coordinator_address"], timeout, src)
    # Cross-process collectives for the CPU backend (GPUs and TPUs bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
    except Exception as e:
        raise ConfigError(f"{src}: cannot join the distributed run at "
                          f"{kwargs.get('coordinator_address', 'the detected coordinator')} within {timeout} s "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _wait_for_coordinator(address: str, timeout: int, src: str) -> None:
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
                return
        except (OSError, ValueError):
            if time.time() >= deadline:
                raise ConfigError(f"{src}: cannot join the distributed run: coordinator {address} did not "
                                  f"answer within {timeout} s (`gpu.distributed.timeout_s`)")
            time.sleep(0.5)


def make_mesh(gpu_cfg, src: str = "") -> Mesh:
    devices = jax.devices()
    if gpu_cfg.device_ids is not None:
        ids = {d.id: d for d in devices}
        missing = [i for i in gpu_cfg.device_ids if i not in ids]
        if missing:
            raise ConfigError(f"{src}: `gpu.device_ids` {missing} do not exist; devices here: {sorted(ids)}")
        devices = [ids[i] for i in gpu_cfg.device_ids]
    if gpu_cfg.ddp is False:  # the seed's "no DDP": one device
        if gpu_cfg.mesh and math.prod(v for v in gpu_cfg.mesh.values() if v != -1) > 1:
            raise ConfigError(f"{src}: `gpu.ddp: false` trains on one device, but `gpu.mesh` {gpu_cfg.mesh} "
                              "asks for several; drop one of them")
        devices = devices[:1]
    n = len(devices)
    shape = dict(gpu_cfg.mesh or {"data": -1})
    for k in shape:
        if k not in AXES:
            raise ConfigError(f"{src}: `gpu.mesh.{k}` is not a mesh axis (axes: {', '.join(AXES)})")
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"{src}: only one `gpu.mesh` axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % known:
            raise ConfigError(f"{src}: `gpu.mesh` {shape} does not divide the {n} devices")
        sizes[free[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ConfigError(f"{src}: `gpu.mesh` {sizes} has {math.prod(sizes.values())} devices but "
                          f"{n} are available")
    arr = np.asarray(devices, dtype=object).reshape([sizes[a] for a in AXES])
    return Mesh(arr, AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _fits(dim: int, mesh: Mesh, axis: str | None) -> str | None:
    if axis is None:
        return None
    return axis if dim % mesh.shape[axis] == 0 and mesh.shape[axis] > 1 else None


def param_specs(abstract: Any, mesh: Mesh, roles: dict[str, str]) -> Any:
    """PartitionSpecs for the base tree from the architecture's table of linear roles."""
    flat = traverse_util.flatten_dict(abstract)
    out = {}
    for path, leaf in flat.items():
        shape = leaf.shape
        stacked = path[0] == "layers"
        lead = (None,) if stacked else ()
        body = shape[1:] if stacked else shape
        spec: tuple = (None,) * len(body)
        name = path[-2] if len(path) >= 2 else path[-1]
        if path[-1] == "kernel" and len(body) == 2 and name in roles:
            a_in, a_out = ("fsdp", "tensor") if roles[name] == "col" else ("tensor", "fsdp")
            spec = (_fits(body[0], mesh, a_in), _fits(body[1], mesh, a_out))
        elif path[-1] == "kernel" and len(body) == 3 and name in roles:
            # A mixture of experts' stacked kernels [E, in, out]: each expert split as a dense kernel.
            a_in, a_out = ("fsdp", "tensor") if roles[name] == "col" else ("tensor", "fsdp")
            spec = (None, _fits(body[1], mesh, a_in), _fits(body[2], mesh, a_out))
        elif path[-1] == "bias" and len(body) == 1 and roles.get(name) == "col":
            spec = (_fits(body[0], mesh, "tensor"),)
        elif len(body) == 2:  # embeddings [V, D] and LM heads [D, V]
            spec = (None, _fits(body[1], mesh, "fsdp")) if body[0] > body[1] else (_fits(body[0], mesh, "fsdp"), None)
        out[path] = P(*(lead + spec))
    return traverse_util.unflatten_dict(out)


def per_device_elements(abstract: Any, mesh: Mesh, roles: dict[str, str]) -> int:
    """The elements of the base tree that one device holds under `param_specs` (a dimension that
    an axis does not divide, the embeddings over `tensor` and the norms stay whole)."""
    specs = traverse_util.flatten_dict(param_specs(abstract, mesh, roles))
    total = 0
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        axes = [a for part in specs[path] if part is not None for a in (part if isinstance(part, tuple) else (part,))]
        total += math.prod(leaf.shape) // math.prod(mesh.shape[a] for a in axes)
    return total


def shardings(specs: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """[G, N, ...] batch arrays: rows (N) over data x fsdp."""
    return NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (ndim - 2))))


def put_batch(batch, mesh: Mesh):
    """Host batch (`jaxpref.data.batches`) -> the same batch of global arrays: rows over data x
    fsdp, KTO's per-example labels replicated. Multi-process: each process contributes its rows."""
    nproc = jax.process_count()

    def put(path, v):
        whole = getattr(path[-1], "name", None) in ("labels", "pair_w", "ntok_c", "ntok_r", "ntok_full") or v.ndim < 2
        sh = replicated(mesh) if whole else batch_sharding(mesh, v.ndim)
        if nproc == 1:
            return jax.device_put(v, sh)
        if not whole:
            rows = v.shape[1] // nproc
            i = jax.process_index()
            return jax.make_array_from_process_local_data(sh, v[:, i * rows:(i + 1) * rows], v.shape)
        return jax.make_array_from_process_local_data(sh, v, v.shape)

    return jax.tree_util.tree_map_with_path(put, batch.on_device())
