"""`.env` in the working directory: KEY=VALUE lines (HF_TOKEN, WANDB_API_KEY, ...) read into the
environment by every command that may reach the Hub or a tracker; variables already set win."""
from __future__ import annotations

from pathlib import Path

from jaxpref.errors import JaxprefError, read_utf8


def load_dotenv(path: Path = Path(".env")) -> None:
    """KEY=VALUE lines of .env into the environment (python-dotenv; existing variables win)."""
    if not path.is_file():
        return
    import dotenv

    read_utf8(path, JaxprefError, "it", "save it as UTF-8 or remove it")
    dotenv.load_dotenv(path, override=False, encoding="utf-8")
