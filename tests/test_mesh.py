"""Every mesh gives the single-device numbers: 8 virtual CPU devices, several mesh shapes, the same
global batch; and two processes joined by jax.distributed give one process's metrics."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO

WORKER = Path(__file__).resolve().parent / "mesh_worker.py"
GLOBAL_PAIRS = 8


def _run(spec: dict, env_extra: dict, timeout=600):
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)
    assert proc.returncode == 0 and "MESH_WORKER_OK" in proc.stdout, proc.stderr[-3000:]
    return proc


def _losses(run: Path):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["rewards/margins"], r["grad_norm"], r["logps/chosen"]) for r in rows]


MESHES = {
    "single": (None, [0], GLOBAL_PAIRS),
    "8x1x1": ({"data": 8, "fsdp": 1, "tensor": 1}, None, 1),
    "2x4x1": ({"data": 2, "fsdp": 4, "tensor": 1}, None, 1),
    "1x8x1": ({"data": 1, "fsdp": 8, "tensor": 1}, None, 1),
    "2x2x2": ({"data": 2, "fsdp": 2, "tensor": 2}, None, 2),
    # Padding-free shared-prompt rows: one stream per data shard (4 streams of 2 pairs).
    "2x2x2 padding-free": ({"data": 2, "fsdp": 2, "tensor": 2}, None, 2),
    # The same with the flash path (two causal calls per shared-prompt block, inside shard_map):
    # tokamax's XLA reference kernel on the CPU.
    "2x2x2 padding-free flash": ({"data": 2, "fsdp": 2, "tensor": 2}, None, 2),
}
TRAINING = {"2x2x2 padding-free": {"padding_free": True, "pair_layout": "shared_prompt"},
            "2x2x2 padding-free flash": {"padding_free": True, "pair_layout": "shared_prompt",
                                         "attention": "flash"}}


def test_meshes_give_single_device_numbers(tmp_path, tiny_llama):
    from conftest import write_pairs
    data = write_pairs(tmp_path / "pairs.jsonl", n=32)
    jobs = [{"out": str(tmp_path / name), "mesh": mesh, "device_ids": ids, "per_device": pd,
             "training": TRAINING.get(name, {})} for name, (mesh, ids, pd) in MESHES.items()]
    _run({"model": str(tiny_llama), "data": str(data), "jobs": jobs},
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    ref = _losses(tmp_path / "single" / "tiny")
    ref_ad = load_file(str(tmp_path / "single" / "tiny" / "adapter" / "adapter_model.safetensors"))
    assert len(ref) == 3
    for name in MESHES:
        got = _losses(tmp_path / name / "tiny")
        np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-6, err_msg=name)
        ad = load_file(str(tmp_path / name / "tiny" / "adapter" / "adapter_model.safetensors"))
        for k, v in ref_ad.items():
            # Absolute 1e-5 on LoRA weights of order 1e-2: Adam divides by sqrt(v), so a gradient
            # near zero amplifies reduction-order differences in its last bits.
            np.testing.assert_allclose(ad[k], v, rtol=0, atol=1e-5, err_msg=f"{name} {k}")
        worst = max(float(np.abs(ad[k] - v).max()) for k, v in ref_ad.items())
        print(f"mesh {name}: max |loss diff| {np.abs(np.array(got) - np.array(ref)).max():.2e}, "
              f"max |LoRA diff| {worst:.2e}")


# KTO needs 2 examples per device at least (validate): the global batch is 8 everywhere.
KTO_MESHES = {"single": (None, [0], 8), "4x1x2": ({"data": 4, "fsdp": 1, "tensor": 2}, None, 2),
              "2x2x2": ({"data": 2, "fsdp": 2, "tensor": 2}, None, 2)}


@pytest.mark.slow
def test_kto_meshes_give_single_device_numbers(tmp_path, tiny_llama):
    """KTO (paired data unpaired, its KL estimate over the global batch's mismatched pairs) on 8
    virtual devices: the losses, KL and rewards of one device within 1e-5."""
    from conftest import write_pairs
    data = write_pairs(tmp_path / "pairs.jsonl", n=32)
    pt = {"method": "kto", "beta": 0.1}
    jobs = [{"out": str(tmp_path / name), "mesh": mesh, "device_ids": ids, "per_device": pd, "post_training": pt}
            for name, (mesh, ids, pd) in KTO_MESHES.items()]
    _run({"model": str(tiny_llama), "data": str(data), "jobs": jobs},
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    keys = ("loss", "kl", "grad_norm", "logps/chosen", "rewards/chosen")   # sequential: chosen ones first
    rows = lambda name: [json.loads(line) for line in (tmp_path / name / "tiny" / "metrics.jsonl").read_text().splitlines()]
    ref = rows("single")
    assert len(ref) == 3 and all(r["kl"] > 0 for r in ref[1:])
    for name in KTO_MESHES:
        got = rows(name)
        for key in keys:
            np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} {key}")
        print(f"kto mesh {name}: max |loss diff| "
              f"{max(abs(g['loss'] - r['loss']) for g, r in zip(got, ref)):.2e}, "
              f"max |kl diff| {max(abs(g['kl'] - r['kl']) for g, r in zip(got, ref)):.2e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, tiny_llama):
    from conftest import write_pairs
    data = write_pairs(tmp_path / "pairs.jsonl", n=32)
    one = tmp_path / "one"
    _run({"model": str(tiny_llama), "data": str(data),
          "jobs": [{"out": str(one), "mesh": {"data": 2}, "per_device": 2}]},
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    two = tmp_path / "two"
    _two_processes(tiny_llama, data, {"out": str(two), "mesh": {"data": 2}, "per_device": 2})
    np.testing.assert_allclose(np.array(_losses(two / "tiny")), np.array(_losses(one / "tiny")),
                               rtol=1e-5, atol=1e-6)


def _two_processes(tiny_llama, data, job: dict) -> None:
    """`job` run by two processes joined by jax.distributed, one CPU device each."""
    port = _free_port()
    procs = []
    for pid in range(2):
        spec = {"model": str(tiny_llama), "data": str(data),
                "distributed": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                                "process_id": pid, "timeout_s": 120},
                "jobs": [job]}
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        o, e = p.communicate(timeout=600)
        assert p.returncode == 0 and "MESH_WORKER_OK" in o, e[-3000:]


def test_two_processes_checkpoint_and_resume_exactly(tmp_path, tiny_llama):
    """Two processes save Orbax checkpoints together, and resume from one to the losses and
    adapter of their uninterrupted run."""
    import shutil

    from conftest import write_pairs
    data = write_pairs(tmp_path / "pairs.jsonl", n=32)
    job = {"mesh": {"data": 2}, "per_device": 2, "training": {"max_steps": 4},
           "finetuning": {"save_steps": 2}}
    _two_processes(tiny_llama, data, {**job, "out": str(tmp_path / "straight")})
    straight, resumed = tmp_path / "straight" / "tiny", tmp_path / "resumed" / "tiny"
    assert sorted(int(d.name) for d in (straight / "checkpoints").iterdir() if d.name.isdigit()) == [2, 4]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    shutil.rmtree(resumed / "adapter")
    (resumed / "FINISHED").unlink()
    _two_processes(tiny_llama, data, {**job, "out": str(tmp_path / "resumed"), "resume": True})
    assert _losses(resumed) == _losses(straight)
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("gpu,needle", [
    ({"mesh": {"data": 2}}, "available"),
    ({"device_ids": [7]}, "do not exist"),
    ({"mesh": {"data": -1, "fsdp": -1}}, "only one"),
    ({"mesh": {"model": 1}}, "not a mesh axis"),
    # Sizes below 1 other than -1 (on 8 devices {data: -2, fsdp: -4} was a numpy traceback).
    ({"mesh": {"data": 0}}, "`gpu.mesh.data` must be >= 1, or -1"),
    ({"mesh": {"data": -2, "fsdp": -4}}, "`gpu.mesh.data` must be >= 1, or -1"),
])
def test_bad_mesh_is_one_line(tmp_path, tiny_llama, tiny_pairs, capsys, gpu, needle):
    from conftest import write_config
    from jaxpref import train
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, gpu=gpu)
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_unreachable_coordinator_times_out_with_one_line(tmp_path, tiny_llama, tiny_pairs):
    from conftest import write_config
    port = _free_port()
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       gpu={"distributed": {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                                            "process_id": 1, "timeout_s": 5}})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(cfg), "--output-dir",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("jaxpref")]
    assert proc.returncode == 2 and lines and "cannot join" in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_expert_kernels_split_like_their_dense_namesakes(tmp_path):
    """A mixture's stacked expert kernels [L, E, in, out]: the expert axis whole, gate_up_proj's
    input over fsdp and output over tensor ("col"), down_proj the reverse ("row"). (param_specs
    reads only the mesh's axis sizes.)"""
    from types import SimpleNamespace

    import transformers
    from jax.sharding import PartitionSpec as P

    from jaxpref.models.source import resolve
    from jaxpref.models.weights import build
    from jaxpref.runtime.mesh import param_specs

    transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2).save_pretrained(tmp_path)
    bundle = build(resolve(str(tmp_path)))
    specs = param_specs(bundle.abstract_params(), SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 2}),
                        bundle.arch.roles)
    experts = specs["layers"]["mlp"]["experts"]
    assert experts["gate_up_proj"]["kernel"] == P(None, None, "fsdp", "tensor")
    assert experts["down_proj"]["kernel"] == P(None, None, "tensor", "fsdp")
    assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")


def test_dry_run_on_two_devices_plans_what_the_run_does(tmp_path, tiny_llama, tiny_pairs):
    """On 2 data-parallel devices the dry run counts the global batch (16 pairs, 2 per device: 4
    steps an epoch, as the run) and refuses a token budget as the run does (it said OK)."""
    from conftest import write_config
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = {}
    for name, training in (("plain", {"num_epochs": 1, "max_steps": -1}), ("budget", {"max_tokens_per_batch": 256})):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_llama, tiny_pairs,
                           training={"per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_length": 64,
                                     **training})
        out[name] = subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(cfg), "--dry-run"],
                                   capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    plain, budget = out["plain"], out["budget"]
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "schedule         4 steps/epoch, 4 steps" in plain.stdout, plain.stdout
    lines = [l for l in budget.stderr.strip().splitlines() if l.startswith("jaxpref")]
    assert budget.returncode == 2 and len(lines) == 1, budget.stderr[-2000:]
    assert "`training.max_tokens_per_batch` is not available yet on 2 data-parallel devices" in lines[0]


def test_memory_plan_splits_the_base_as_the_mesh_does(tmp_path):
    """The dry run's per-device weights on {fsdp: 2, tensor: 4}: each transformers parameter whole
    or split as its layer is (attention and MLP matrices over fsdp x tensor where the dims divide;
    the embeddings and LM head [V, D] over fsdp on D only; norms whole), counted from the
    transformers model. (Before, every weight was taken as split 8 ways.) A full fine-tune's
    trainable tree, gradients and Adam moments are split as the base, and its reference is the
    loaded base, no copy. (param_specs and the plan read only the mesh's axis sizes.)"""
    from types import SimpleNamespace

    import transformers

    from jaxpref.config import config_from_dict
    from jaxpref.models.source import resolve
    from jaxpref.models.weights import build
    from jaxpref.runtime.memory import memory_plan
    from jaxpref.runtime.mesh import per_device_elements

    # 6 heads of 8 (q out 48 splits over tensor 4, k/v out 24 too), ffn 90 (whole over tensor 4).
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=109, hidden_size=48, intermediate_size=90, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    expected = 0
    for name, p in model.named_parameters():
        out_dim, in_dim = (p.shape + (1,))[:2]
        if p.ndim == 1:
            split = 1
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            split = (2 if in_dim % 2 == 0 else 1) * (4 if out_dim % 4 == 0 else 1)   # in: fsdp, out: tensor
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            split = (4 if in_dim % 4 == 0 else 1) * (2 if out_dim % 2 == 0 else 1)   # in: tensor, out: fsdp
        else:   # embed_tokens / lm_head [V, D]: D over fsdp
            split = 2
        expected += p.numel() // split
    bundle = build(resolve(str(tmp_path)))
    abstract = bundle.abstract_params()
    total = sum(p.numel() for p in model.parameters())
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 4})
    assert per_device_elements(abstract, mesh, bundle.arch.roles) == expected
    for lora in ({"r": 4, "lora_alpha": 8}, {"enabled": False}):
        cfg = config_from_dict({"models": [{"name": "m", "huggingface_id": str(tmp_path)}], "dataset": {"name": "x"},
                                "lora": lora, "training": {"per_device_train_batch_size": 1}})
        trainable = 1000 if lora.get("enabled", True) else total
        plan = memory_plan(cfg, bundle.args, total, trainable, [(1, 8, 32, 16)], mesh=mesh, runtime=0,
                           base_per_device=expected)
        assert plan["base weights"] == expected * 4
        if lora.get("enabled", True):
            assert plan["reference copy"] == 0 and plan["LoRA + grads"] == plan["optimizer state"] == 1000 * 8
        else:   # the frozen base, its trained copy, the gradients and two Adam moments: 5 trees
            assert plan["reference copy"] == expected * 4 and plan["LoRA + grads"] == expected * 4
            assert plan["optimizer state"] == expected * 8


def test_a_resume_on_a_mesh_of_another_global_batch_is_refused(tmp_path):
    """The fingerprint a checkpoint keeps names the global batch (per device x data x fsdp): a
    checkpoint of {data: 8} at 1 pair per device resumed on one device at 1 pair per device
    (1 pair a step instead of 8) was accepted and trained other steps; the same global batch on
    another mesh is accepted (it continues within float rounding: checked bit for bit in the slow
    test below)."""
    from types import SimpleNamespace

    from jaxpref.config import config_from_dict
    from jaxpref.errors import JaxprefError
    from jaxpref.training.checkpoint import check_fingerprint
    from jaxpref.training.setup import critical_fingerprint

    cfg = config_from_dict({"models": [{"name": "m", "huggingface_id": "x"}], "dataset": {"name": "d"},
                            "training": {"per_device_train_batch_size": 1}})
    entry = SimpleNamespace(huggingface_id="x", ref_model_id=None)
    fp = lambda dp: critical_fingerprint(cfg, entry, "fp", "shared_prompt", data_parallel=dp)
    with pytest.raises(JaxprefError, match=r"`global batch \(per_device_train_batch_size x gpu.mesh data x fsdp\)` "
                                           r"changed \(checkpoint: 8, now: 1\)"):
        check_fingerprint(fp(8), fp(1), tmp_path, force=False)
    assert check_fingerprint(fp(8), fp(8), tmp_path, force=False) == []
    # A checkpoint of an older version (no global batch recorded) is not compared on it.
    old = {k: v for k, v in fp(8).items() if not k.startswith("global batch")}
    assert check_fingerprint(old, fp(1), tmp_path, force=False) == []


@pytest.mark.slow
def test_resume_on_other_meshes(tmp_path, tiny_llama):
    """A checkpoint written on {data: 2, fsdp: 4} (1 pair per device): resumed on {data: 8} at 1 pair
    per device, the straight run's losses bit for bit; on one device at 1 pair per device, refused
    in one line naming the global batch; at 8 pairs per device, refused naming the per-device
    batch (--resume-force continues it)."""
    import shutil

    from conftest import write_pairs
    data = write_pairs(tmp_path / "pairs.jsonl", n=32)
    job = {"per_device": 1, "training": {"max_steps": 4}, "finetuning": {"save_steps": 2}}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    _run({"model": str(tiny_llama), "data": str(data),
          "jobs": [{**job, "out": str(tmp_path / "straight"), "mesh": {"data": 2, "fsdp": 4}}]}, env)
    straight = tmp_path / "straight" / "tiny"

    def resumable(name):
        d = tmp_path / name / "tiny"
        shutil.copytree(straight, d)
        shutil.rmtree(d / "checkpoints" / "4")
        shutil.rmtree(d / "adapter")
        (d / "FINISHED").unlink()
        return d
    _run({"model": str(tiny_llama), "data": str(data),
          "jobs": [{**job, "out": str(resumable("d8").parent), "mesh": {"data": 8}, "resume": True}]}, env)
    assert _losses(tmp_path / "d8" / "tiny") == _losses(straight)
    for name, per_device, needle in (("one", 1, "`global batch (per_device_train_batch_size x gpu.mesh data x fsdp)` "
                                                "changed (checkpoint: 8, now: 1)"),
                                     ("one8", 8, "`per_device_train_batch_size` changed (checkpoint: 1, now: 8)")):
        resumable(name)
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(json.dumps({
            "models": [{"name": "tiny", "huggingface_id": str(tiny_llama)}], "dataset": {"name": str(data)},
            "post_training": {"method": "dpo", "beta": 0.1},
            "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]},
            "training": {"max_steps": 4, "per_device_train_batch_size": per_device, "learning_rate": 0.5,
                         "optimizer": "sgd", "max_length": 64, "logging_steps": 1, "seed": 0},
            "finetuning": {"save_steps": 2}, "gpu": {"device_ids": [0]},
            "logging": {"report_to": [], "progress_bar": False}}))
        proc = subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(cfg), "--output-dir",
                               str(tmp_path / name), "--resume"], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, **env}, timeout=600)
        lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxpref")]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(tmp_path / "one8.yaml"),
                           "--output-dir", str(tmp_path / "one8"), "--resume", "--resume-force"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.array(_losses(tmp_path / "one8" / "tiny")), np.array(_losses(straight)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["packed", "packed_shared_prompt"])
def test_packed_rows_divide_over_the_data_parallel_devices(kind):
    """Packed rows on 8 data-parallel devices (`streams` 8): 8 short pairs pack into fewer than 8
    rows; the rows are padded to a multiple of 8 so that the mesh splits them (on {data: 2, fsdp: 4}
    device_put raised IndivisibleError: "axis 1 is partitioned 8 times, but the dimension size is 4")."""
    import jax

    from jaxpref.data.iterator import BatchIterator
    from jaxpref.data.layouts import Layout
    from jaxpref.data.tokenize import Tokenized

    rng = np.random.default_rng(0)
    ids = lambda: [int(x) for x in rng.integers(3, 100, rng.integers(2, 6))]
    data = Tokenized([ids() for _ in range(16)], [ids() for _ in range(16)], [ids() for _ in range(16)])
    it = BatchIterator(data, 8, 1, seed=0, layout=Layout(kind, 64, buckets=(16, 32, 64), pack_length=64, streams=8))
    batch, _ = next(it)
    arrays = jax.tree_util.tree_leaves(batch.on_device())
    rows = batch.on_device().input_ids.shape[1]
    assert rows == 8, rows   # 2 rows of 64 tokens hold the pairs: 6 empty rows added
    assert all(a.shape[1] == rows for a in arrays if a.ndim >= 3)


@pytest.mark.slow
def test_packed_layout_on_meshes_gives_single_device_numbers(tmp_path, tiny_llama):
    """`pair_layout: packed` on {data: 2, fsdp: 4} and {data: 1, fsdp: 8} (IndivisibleError before
    the packed rows were padded to a multiple of 8): the single device's losses and LoRA."""
    from conftest import write_pairs
    data = write_pairs(tmp_path / "pairs.jsonl", n=32)
    packed = {"pair_layout": "packed", "pack_length": 64}
    meshes = {"single": (None, [0], 8), "2x4x1": ({"data": 2, "fsdp": 4, "tensor": 1}, None, 1),
              "1x8x1": ({"data": 1, "fsdp": 8, "tensor": 1}, None, 1)}
    _run({"model": str(tiny_llama), "data": str(data),
          "jobs": [{"out": str(tmp_path / name), "mesh": mesh, "device_ids": ids, "per_device": pd, "training": packed}
                   for name, (mesh, ids, pd) in meshes.items()]},
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    ref = _losses(tmp_path / "single" / "tiny")
    ref_ad = load_file(str(tmp_path / "single" / "tiny" / "adapter" / "adapter_model.safetensors"))
    for name in meshes:
        np.testing.assert_allclose(np.array(_losses(tmp_path / name / "tiny")), np.array(ref), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        ad = load_file(str(tmp_path / name / "tiny" / "adapter" / "adapter_model.safetensors"))
        for k, v in ref_ad.items():
            np.testing.assert_allclose(ad[k], v, rtol=0, atol=1e-5, err_msg=f"{name} {k}")


def test_dry_run_says_its_mesh_is_this_process_only_under_distributed(tmp_path, tiny_llama, tiny_pairs, capsys):
    """A dry run does not join `gpu.distributed` (it printed the local mesh and batch as the run's):
    its mesh line says so; without `distributed` it does not."""
    from conftest import write_config
    from jaxpref import train
    for name, gpu, note in (("dist", {"distributed": {"auto": True}}, True), ("local", {}, False)):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_llama, tiny_pairs, gpu=gpu)
        code = train.main(["--config", str(cfg), "--dry-run"])
        out = capsys.readouterr().out
        line = next(l for l in out.splitlines() if l.strip().startswith("mesh "))
        assert code == 0 and ("of this process only (a dry run does not join `gpu.distributed`" in line) == note, line
