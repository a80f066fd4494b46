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


def write_or_exit_2(prog: str, write, target: str):
    """(`write()`'s result, 0), or (None, 2) after one line on stderr: a JaxprefError's message, or
    why `target` (what `write` writes) could not be written."""
    import sys

    try:
        return write(), 0
    except JaxprefError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"{prog}: error: cannot write {target} ({e.strerror or e})", file=sys.stderr)
    return None, 2


def read_utf8(path, error: type[JaxprefError], what: str, hint: str) -> str:
    """A text file's contents, or `error` in one line: the first line that is not UTF-8 (and `hint`),
    or why `what` cannot be read."""
    src = str(path)
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")   # whole: the error's offset counts from the file's start
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise error(f"{src}: line {line} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); {hint}")
    except OSError as e:
        raise error(f"{src}: cannot read {what} ({e.strerror or e})")


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


def check_choice(value: str, allowed, key: str, src: str) -> None:
    """`value` of config key `key` (in file `src`) must be one of `allowed`; the error names the
    closest one."""
    import difflib

    allowed = list(allowed)
    if value not in allowed:
        close = [a for a in map(str, allowed) if a.lower() == str(value).lower()] or \
            difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ConfigError(f"{src}: `{key}` is `{value}`, expected one of {', '.join(map(str, allowed))}{hint}")


# Errors of the file system rather than of jaxpref: a full disk, a quota, a size limit, a folder
# that cannot be written. Orbax's background writes (tensorstore) report them in their messages.
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large", "RESOURCE_EXHAUSTED: Error writing")


def os_error_line(e: BaseException) -> str | None:
    """One line naming what could not be written and why, if `e` (or what caused it) is a file
    system error; else None."""
    import errno
    import re

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = " ".join(str(e).split())
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"{(e.strerror or text).lower()}" + (f" while writing {e.filename}" if e.filename else "")
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and e.filename:
            return f"{e.filename}: {(e.strerror or text).lower()}"
        if any(k in text for k in _DISK_FULL):
            m = re.search(r'local file "([^"]+)"', text) or re.search(r'(?:writing|file) "?([^":]+)"?', text)
            what = f" while writing {m.group(1)}" if m else ""
            return f"no space left on the device{what}"
        e = e.__cause__ or e.__context__
    return None
