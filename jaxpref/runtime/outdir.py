"""Writing an output folder (an adapter, a merged model) without losing what the user had there.

A folder is written whole into a temporary sibling and renamed into place, so that a crash leaves
either the old folder or the new one, never half of either. An existing folder is replaced only
when it holds a previous export of ours (every file in it listed by our manifest, or, for adapters
written before the manifest existed, only adapter and tokenizer files) or when the caller was
given the flag that allows it; the folders in `protect` (the base model's, the run's) never are.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from jaxpref.errors import ConfigError

MANIFEST = ".jaxpref-export.json"
_TMP, _OLD = ".jaxpref-tmp-", ".jaxpref-old-"
# What `save_adapter` wrote before it kept a manifest: adapter files and tokenizer files.
_ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                  "merges.txt", "added_tokens.json", "vocab.txt", "spiece.model", "README.md"}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}


def is_our_export(folder: Path) -> bool:
    """Whether `folder` holds nothing but an export of ours (adapter or merged model)."""
    folder = Path(folder)
    present = _files(folder) - {MANIFEST}
    try:
        listed = set(json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"])
        return present <= listed
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "adapter_config.json" in present and present <= _ADAPTER_FILES


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside it."""
    return a == b or b in a.parents


def _absolute(p, resolve: bool = False) -> Path:
    """`p` with `~` expanded, made absolute (links resolved with `resolve`)."""
    p = Path(os.path.abspath(Path(p).expanduser()))
    return p.resolve() if resolve else p


def refuse_protected(out_dir: Path, flag: str, protect: dict[str, Path], overwrite_flag: str) -> None:
    """Refuse, in one line, an output `out_dir` (given by `flag`) that is, or holds, one of the
    folders of `protect` (what -> folder: the base model's, the run's), whatever the flags."""
    out = _absolute(out_dir, resolve=True)
    for what, folder in protect.items():
        folder = _absolute(folder, resolve=True)
        if _inside(folder, out):
            raise ConfigError(f"{flag} {out_dir}: that is {'' if folder == out else 'a folder holding '}"
                              f"{what} ({folder}); write somewhere else (never replaced, even with {overwrite_flag})")


def check_replaceable(out_dir: Path, flag: str, overwrite: bool, overwrite_flag: str,
                      protect: dict[str, Path] | None = None, within: dict[str, Path] | None = None) -> None:
    """Refuse, in one line, to write `out_dir` (given by `flag`) where that would lose a user's files.

    `protect`: what -> folder that must never be replaced nor lie inside the output (the base
    model's folder, the run folder), whatever the flags; `within`: what -> folder that the output
    must not lie inside either (the run folder, whose adapter/ and checkpoints/ are the export's
    source)."""
    out = _absolute(out_dir)
    refuse_protected(out_dir, flag, protect or {}, overwrite_flag)
    for what, folder in (within or {}).items():
        folder = _absolute(folder, resolve=True)
        if _inside(out.resolve(), folder):
            raise ConfigError(f"{flag} {out_dir}: that is inside {what} ({folder}); write somewhere else "
                              f"(never written, even with {overwrite_flag})")
    if out.is_file():
        raise ConfigError(f"{flag} {out_dir}: is a file, expected a directory")
    if not out.is_dir() or not any(out.iterdir()) or overwrite or is_our_export(out):
        return
    shown = sorted(p.name for p in out.iterdir())
    raise ConfigError(f"{flag} {out_dir}: the folder already holds files that are not a jaxpref export "
                      f"({', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}); pass {overwrite_flag} "
                      "to replace it, or choose an empty folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _tidy(out: Path) -> None:
    """Leftovers of a writer that was killed: its temporary folder goes (it was never whole); a
    replaced folder set aside before the final rename goes back if nothing took its place."""
    for p in out.parent.glob(f".{out.name}{_TMP}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}{_OLD}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if out.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(out)


@contextlib.contextmanager
def write_dir(out_dir: Path, kind: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out_dir` to write into; on success, list its files in
    our manifest and rename it into place (a previous folder there is replaced: the caller checked
    with `check_replaceable` first). On an error the temporary folder is removed and `out_dir` is
    left as it was."""
    out = _absolute(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _tidy(out)
    tmp = out.with_name(f".{out.name}{_TMP}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps({"kind": kind, "files": sorted(_files(tmp))}, indent=1) + "\n")
        _share(tmp)
        _sync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}{_OLD}{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    """This process's umask, read without changing it (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _share(folder: Path) -> None:
    """Files 0644 and folders 0755 (under the umask), as `cp` would make them: some writers
    (safetensors) create their files 0600, which other users and tools could not read."""
    mask = _umask()
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _sync(folder: Path) -> None:
    """Flush the files' data before the rename makes them visible (a power cut keeps whole files)."""
    for p in folder.rglob("*"):
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
