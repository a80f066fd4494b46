"""Run by tests/test_mesh.py in a subprocess with 8 virtual CPU devices (or as one process of a
jax.distributed job): train a tiny model on several meshes and print the metrics as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(model: str, data: str, out: str, mesh: dict | None, device_ids, per_device: int, steps: int = 3,
        distributed: dict | None = None, name: str = "tiny", training: dict | None = None,
        finetuning: dict | None = None, resume: bool = False, post_training: dict | None = None):
    from jaxpref.config import config_from_dict
    from jaxpref.training.loop import train_model

    cfg = config_from_dict({
        "models": [{"name": name, "huggingface_id": model}],
        "dataset": {"name": data},
        "post_training": post_training or {"method": "dpo", "beta": 0.1},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]},
        # SGD: the update is linear in the gradient, so the comparison tests the sharded gradient
        # itself (Adam's first steps divide tiny gradients by their own magnitude).
        "training": {"max_steps": steps, "per_device_train_batch_size": per_device, "learning_rate": 0.5,
                     "optimizer": "sgd",
                     "max_length": 64, "logging_steps": 1, "seed": 0, **(training or {})},
        "finetuning": finetuning or {},
        "gpu": {"mesh": mesh, "device_ids": device_ids, "distributed": distributed},
        "logging": {"report_to": [], "progress_bar": False},
    })
    train_model(cfg, 0, Path(out) / name, resume=resume)


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("distributed"):
        from jaxpref.config import GpuConfig
        from jaxpref.config.schema import DistributedConfig
        from jaxpref.runtime.mesh import init_distributed
        init_distributed(GpuConfig(distributed=DistributedConfig(**spec["distributed"])))
    for job in spec["jobs"]:
        run(spec["model"], spec["data"], job["out"], job.get("mesh"), job.get("device_ids"), job["per_device"],
            distributed=spec.get("distributed"), name=job.get("name", "tiny"), training=job.get("training"),
            finetuning=job.get("finetuning"), resume=job.get("resume", False),
            post_training=job.get("post_training"))
    print("MESH_WORKER_OK")


if __name__ == "__main__":
    main()
