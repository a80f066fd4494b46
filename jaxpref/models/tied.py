"""An LM head stored next to embeddings that config.json ties to it."""
from __future__ import annotations

import numpy as np

from jaxpref.errors import ModelSourceError


def check_tied_head(spec: str, head: tuple[str, np.ndarray], embedding: np.ndarray, dtype) -> None:
    """config.json ties the LM head to the embedding, and the checkpoint holds a head of its own
    (`head`: its name and tensor [V, D]): transformers (>= 5) ties the two only when they are equal,
    else it runs the stored head. Equal ones (as .bin conversions save) load; a head that differs
    is refused, naming the key."""
    name, arr = head
    if arr.shape != embedding.shape or not np.array_equal(np.asarray(arr, dtype), embedding):
        raise ModelSourceError(
            f"model `{spec}`: config.json has `tie_word_embeddings: true`, but the checkpoint holds its own "
            f"`{name}`, which differs from the token embedding (transformers then leaves the two untied); set "
            "`tie_word_embeddings: false` in config.json to use it, or remove the tensor")
