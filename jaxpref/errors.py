"""User-facing errors: one line on stderr, exit code 2, never a traceback."""


class JaxprefError(Exception):
    """An error caused by the user's input (config, data, checkpoint, flag).

    The message is one line that names what is wrong and where.
    """


class ConfigError(JaxprefError):
    pass


class ModelSourceError(JaxprefError):
    pass


class DataError(JaxprefError):
    pass


def check_writable(path, flag: str, directory: bool) -> None:
    """Fail before any work when `path` (given by `flag`) cannot be written: a file where a folder
    is wanted or the reverse, or a first existing ancestor that is not a writable folder."""
    import os
    from pathlib import Path

    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise ConfigError(f"{flag} {path}: is a {'file' if directory else 'directory'}, "
                          f"expected a {'directory' if directory else 'file'}")
    parent = path if (directory and path.exists()) else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: cannot write there ({parent} is not a writable directory)")
