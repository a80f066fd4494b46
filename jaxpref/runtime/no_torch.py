"""Keep PyTorch out of jaxpref's command-line processes.

jaxpref never uses torch, but transformers imports it whenever it is installed: loading a tokenizer
with `AutoTokenizer` reaches `transformers.modeling_rope_utils`, which runs `import torch` if
`is_torch_available()`. That import costs about 490 MB of resident memory and 2.5 s of start-up.

transformers and datasets decide availability with `importlib.util.find_spec("torch")`, so
`hide_torch()` makes the standard path finder stop finding the `torch` package: the checks answer
False and `import torch` raises ModuleNotFoundError, as if torch were not installed. The usual
`sys.modules["torch"] = None` does not do: datasets' fingerprint hasher runs `import torch` whenever
`"torch" in sys.modules`, and that key would be present.

Only the `python -m jaxpref.{train,evaluate,export}` entry points call `hide_torch()`, in their
`if __name__ == "__main__":` block: a library import must not change what the rest of a process
(a test session, a notebook using transformers models) can import. One library path needs torch:
transformers' GGUF reader imports it unconditionally, so where torch is hidden the one-time GGUF
conversion runs in a child process (jaxpref/models/gguf_convert.py).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys

ALLOW_ENV = "JAXPREF_ALLOW_TORCH"


class _PathFinderWithoutTorch(importlib.machinery.PathFinder):
    """The standard path finder (site-packages, sys.path), blind to the top-level `torch` only."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "torch":  # its submodules are only reached through it
            return None
        return super().find_spec(fullname, path, target)


def _no_torch_notice(record: logging.LogRecord) -> bool:
    # transformers warns on import that models are unavailable; we use none of its models.
    return "PyTorch was not found" not in record.getMessage()


def hide_torch() -> bool:
    """Make torch unimportable for the rest of this process; returns whether torch is now hidden.

    Does nothing when the environment sets JAXPREF_ALLOW_TORCH=1 or when torch is already imported.
    """
    if os.environ.get(ALLOW_ENV) == "1" or "torch" in sys.modules:
        return False
    if _PathFinderWithoutTorch not in sys.meta_path:
        if importlib.machinery.PathFinder not in sys.meta_path:
            return False  # an unusual import system; leave it alone
        sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _PathFinderWithoutTorch
        logging.getLogger("transformers").addFilter(_no_torch_notice)
    return importlib.util.find_spec("torch") is None


def torch_hidden() -> bool:
    """Whether `hide_torch()` hid torch in this process."""
    return _PathFinderWithoutTorch in sys.meta_path and "torch" not in sys.modules
