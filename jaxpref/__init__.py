"""jaxpref: preference post-training (DPO, IPO, KTO, ORPO, SimPO, CPO) with LoRA in JAX.

`jaxpref.train(config, output_dir=..., model_index=...)` is the Python API (`jaxpref.api`); the
command lines are `jaxpref train|evaluate|generate|export|plot|report` (`jaxpref.cli`).
"""


def __getattr__(name: str):
    # `jaxpref.train` and the other commands load on first use: importing jaxpref does no work.
    if name in ("api", "train", "evaluate", "generate", "export", "plot", "report", "cli"):
        import importlib
        return importlib.import_module(f"jaxpref.{name}")
    raise AttributeError(f"module 'jaxpref' has no attribute {name!r}")
