"""Loading a dataset split: a hub id, a local json/jsonl/parquet/csv/arrow file (optionally gzipped), a
directory, a saved `datasets` Dataset or DatasetDict, or `data_files` (a file, glob, list, or a
mapping split -> files). Every failure is a one-line `DataError` naming the source."""
from __future__ import annotations

import re
from pathlib import Path

from jaxpref.errors import DataError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_rows(ds_cfg, split: str | None = None):
    """A `datasets.Dataset` for the configured source and split."""
    import datasets

    # CRITICAL: datasets logs its own error lines before raising; ours names the file and line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    split = split or ds_cfg.split
    if split in ds_cfg.objects:  # given as a `datasets.Dataset` (the Python API)
        return ds_cfg.objects[split]
    name = ds_cfg.name
    path = Path(name).expanduser() if name else None
    local = _local_text_files(ds_cfg, path)
    for f in local:
        _check_utf8(f)
    try:
        return _load(datasets, ds_cfg, split, name, path)
    except DataError:
        raise
    except Exception as e:
        # Name the line of a local file that broke the loader, if one did.
        for f in local:
            if f.name.removesuffix(".gz").endswith((".json", ".jsonl")):
                _check_json(f)
        raise _load_error(e, name, split, local=bool(ds_cfg.data_files) or (path is not None and path.exists()))


def _load(datasets, ds_cfg, split: str, name: str, path: Path | None):
    local = ds_cfg.data_files or (path is not None and path.exists())
    for key in ("config_name", "revision"):   # read by the hub loader only
        if local and getattr(ds_cfg, key):
            raise DataError(f"dataset `{name}` is local: `dataset.{key}` ({getattr(ds_cfg, key)}) applies only "
                            "to a hub dataset, leave it out")
    if ds_cfg.data_files:
        builder = name if name in ("json", "csv", "parquet", "arrow") else _builder_for(ds_cfg.data_files)
        _one_kind(builder, ds_cfg.data_files)
        return datasets.load_dataset(builder, data_files=ds_cfg.data_files, split=split,
                                     **_text_columns_as_text(ds_cfg, builder))
    if path is not None and path.is_file():
        # `.gz`: datasets decompresses it; the type is the suffix before it.
        ext = path.suffixes[-2] if len(path.suffixes) > 1 and path.suffix == ".gz" else path.suffix
        builder = LOCAL_BUILDERS.get(ext)
        if builder is None:
            raise DataError(f"dataset `{name}`: unsupported file type `{path.suffix}` "
                            f"(use one of {', '.join(LOCAL_BUILDERS)}, optionally gzipped)")
        if path.stat().st_size == 0:
            raise DataError(f"dataset `{name}` is empty (0 bytes)")
        # A slice of the file (`train[:1000]`, `train[90%:]`) is datasets' split syntax, as for a folder.
        sliced = re.fullmatch(r"train\[[^\]]*\]", split) is not None
        _only_train(name, "train" if sliced else split, "is one file")
        return datasets.load_dataset(builder, data_files=str(path), split=split if sliced else "train",
                                     **_text_columns_as_text(ds_cfg, builder))
    if path is not None and path.is_dir():
        saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
        if not saved and not _data_files_in(path):
            raise DataError(f"dataset `{name}`: the folder has no json/jsonl/parquet/csv/arrow files "
                            "(optionally gzipped) and is no saved `datasets` Dataset")
        if saved:
            d = datasets.load_from_disk(str(path))
            if isinstance(d, datasets.DatasetDict):
                if split not in d:
                    raise DataError(f"dataset `{name}`: no split `{split}` (splits: {', '.join(d)})")
                return d[split]
            _only_train(name, split, "is one saved Dataset, not a DatasetDict")
            return d
        files = _data_files_in(path)
        kinds = {LOCAL_BUILDERS[Path(f.name.removesuffix(".gz")).suffix] for f in files}
        if len(kinds) > 1:   # datasets reads the most common type only: the others' rows would be lost
            first = {LOCAL_BUILDERS[Path(f.name.removesuffix(".gz")).suffix]: f for f in reversed(files)}
            raise DataError(f"dataset `{name}`: the folder mixes data file types "
                            f"({', '.join(f'{k}: {first[k].relative_to(path)}' for k in sorted(kinds))}); one "
                            "loader reads one type and would leave the other files out: keep files of one type")
        return datasets.load_dataset(str(path), split=split,
                                     **_text_columns_as_text(ds_cfg, kinds.pop() if len(kinds) == 1 else None))
    if name.startswith(("/", "./", "../", "~")) or name.endswith(tuple(LOCAL_BUILDERS)):
        raise DataError(f"dataset `{name}` not found (no such file or directory)")
    from jaxpref.models.source import hub_token   # HF_TOKEN, or the seed's HUGGINGFACE_TOKEN (datasets reads HF_TOKEN only)

    return datasets.load_dataset(name, ds_cfg.config_name, split=split, revision=ds_cfg.revision, token=hub_token())


def _text_columns_as_text(ds_cfg, builder: str | None) -> dict:
    """CSV cells are text, but the CSV reader infers types: a column of answers "4", "007", "1.50"
    would come back as numbers (rows skipped as "not a string", "007" lost). The text columns are
    read as the file's text (an empty cell stays null)."""
    if builder != "csv":
        return {}
    cols = (ds_cfg.prompt_column, ds_cfg.chosen_column, ds_cfg.rejected_column, ds_cfg.completion_column)
    return {"converters": {c: str for c in cols}}


def _load_error(e: Exception, name: str, split: str, local: bool) -> DataError:
    """A loader exception -> one line; the cause's first line too (datasets wraps arrow's)."""
    first = lambda x: " ".join(str(x).split())[:300] if str(x) else ""
    kind = type(e).__name__
    if isinstance(e, ValueError):
        msg = first(e)
        if "corresponds to no data" in msg:   # datasets' words for a file with a header or blank lines only
            return DataError(f"dataset `{name}` has no rows (split `{split}`)")
        if "split" in msg.lower():
            return DataError(f"dataset `{name}`: no split `{split}` ({msg})")
        return DataError(f"dataset `{name}`: {msg}")
    if not local and any(w in kind for w in ("NotFound", "Connection", "Offline", "HTTP", "Timeout")):
        return DataError(f"dataset `{name}` cannot be fetched from the Hugging Face hub ({kind}); "
                         "a local json/jsonl/parquet/csv/arrow file or directory works as `dataset.name`")
    cause = e.__cause__ if isinstance(e.__cause__, Exception) else None
    why = f"{kind}: {first(e)}" + (f"; {type(cause).__name__}: {first(cause)}" if cause else "")
    return DataError(f"dataset `{name}`: cannot load ({why})")


_DATA_SUFFIXES = tuple(LOCAL_BUILDERS) + tuple(f"{x}.gz" for x in LOCAL_BUILDERS)


def _data_files_in(folder: Path) -> list[Path]:
    """The data files `datasets` reads in a folder: not hidden, not its metadata (`config.json`, ...)."""
    from datasets.data_files import FILES_TO_IGNORE

    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name.endswith(_DATA_SUFFIXES)
                  and f.name not in FILES_TO_IGNORE
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def _local_text_files(ds_cfg, path: Path | None) -> list[Path]:
    """The local json/jsonl/csv files (gzipped or not) the source reads: checked before loading."""
    if ds_cfg.data_files:
        found = _globbed(ds_cfg.data_files)
    elif path is not None and "\0" not in str(path) and path.is_file():
        found = [path]
    elif path is not None and "\0" not in str(path) and path.is_dir():
        found = _data_files_in(path)
    else:
        found = []
    return [f for f in found if f.is_file() and f.name.removesuffix(".gz").endswith((".json", ".jsonl", ".csv"))]


def _globbed(files) -> list[Path]:
    """The paths `dataset.data_files` (a file, glob, list, or mapping split -> those) matches."""
    import glob

    files = [x for v in files.values() for x in ([v] if isinstance(v, str) else v)] \
        if isinstance(files, dict) else ([files] if isinstance(files, str) else list(files))
    return [Path(f) for pat in files for f in (glob.glob(str(Path(pat).expanduser()), recursive=True)
                                               if "\0" not in pat else [])]


def _one_kind(builder: str, files) -> None:
    """One loader reads every data file: a file of another type would be parsed as this one (a CSV
    read as JSON: "Invalid value. in row 0", naming no file)."""
    for f in _globbed(files):
        ext = Path(f.name.removesuffix(".gz")).suffix
        if f.is_file() and LOCAL_BUILDERS.get(ext, builder) != builder:
            raise DataError(f"dataset.data_files: {f} is a {ext} file, but the files are read as {builder} "
                            "(one file type per dataset: give files of one type)")


def _open_binary(f: Path):
    import gzip
    return gzip.open(f, "rb") if f.name.endswith(".gz") else open(f, "rb")


def _check_utf8(f: Path) -> None:
    """Arrow takes invalid UTF-8 into string columns without a word; it breaks later. Name the line."""
    import codecs
    import zlib

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_binary(f) as fh:
            for n, line in enumerate(fh, 1):
                try:
                    decoder.decode(line)
                except UnicodeDecodeError as e:
                    raise DataError(f"dataset file {f}: line {n} is not UTF-8 text (byte 0x{line[e.start]:02x} "
                                    f"at column {e.start + 1}); save the file as UTF-8")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"dataset file {f}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def json_kind(v) -> str:
    """What a parsed JSON value is, for a message: "an array", "a string", "null", ..."""
    return {list: "an array", dict: "an object", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def _check_json(f: Path) -> None:
    """The first thing wrong in a JSON or JSON Lines file, as `file: line N ...` (or nothing)."""
    import json

    with _open_binary(f) as fh:
        text = fh.read().decode("utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as whole:
        lines = text.splitlines()
        first = next((i for i, line in enumerate(lines) if line.strip()), None)
        try:
            json.loads(lines[first]) if first is not None else None
        except json.JSONDecodeError:
            raise DataError(f"dataset file {f}: line {whole.lineno}, column {whole.colno}: not valid JSON "
                            f"({whole.msg})")
        for n, line in enumerate(lines, 1):  # JSON Lines: one object per line
            if not line.strip():
                continue
            try:
                row = _strict_loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"dataset file {f}: line {n} is not valid JSON ({e.msg} at column {e.colno})")
            except _ArrowCannot as e:
                raise DataError(f"dataset file {f}: line {n}: {e}")
            if not isinstance(row, dict) and row is not None:
                raise DataError(f"dataset file {f}: line {n} is {json_kind(row)}, not a JSON object (one row per line)")
        return
    try:
        _strict_loads(text)
    except _ArrowCannot as e:
        raise DataError(f"dataset file {f}: {e}")
    rows = doc if isinstance(doc, list) else [doc]
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"dataset file {f}: {'item ' + str(n) + ' of the top-level array' if isinstance(doc, list) else 'the document'} "
                            f"is {json_kind(row)}, not a JSON object")


class _ArrowCannot(ValueError):
    """JSON that Python reads but Arrow's JSON reader refuses (its message names no line)."""


def _strict_loads(text: str):
    """json.loads, refusing what Arrow refuses: a key given twice in one object (Python keeps the
    last), an integer beyond 64 bits and a string escape of half a surrogate pair (`\\ud800`)."""
    import json

    def utf8(v):
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _ArrowCannot(f"a string holds half a surrogate pair (\\u{ord(v[e.start]):04x}), which is "
                                   "no character")
        elif isinstance(v, list):
            for x in v:
                utf8(x)

    def pairs(items):
        seen = set()
        for k, v in items:
            if k in seen:
                raise _ArrowCannot(f"key `{k}` is given twice in one object")
            seen.add(k)
            utf8(k)
            utf8(v)
        return dict(items)

    def integer(s: str):
        v = int(s)
        if not -2**63 <= v < 2**64:
            raise _ArrowCannot(f"the integer {s[:20]}{'...' if len(s) > 20 else ''} does not fit in 64 bits")
        return v
    return json.loads(text, object_pairs_hook=pairs, parse_int=integer)


def _only_train(name: str, split: str, what: str) -> None:
    """A source without named splits is the `train` split; asking it for another one (for
    `dataset.split` or `dataset.eval_split`) would silently give the training rows."""
    if split != "train":
        raise DataError(f"dataset `{name}` {what}, which has only a `train` split; split `{split}` was "
                        "asked (for an eval split use `dataset.eval_fraction`, or a directory or "
                        "DatasetDict with that split)")


def _builder_for(files) -> str:
    if isinstance(files, dict):  # {split: files}
        files = next(iter(files.values()), "")
    first = files if isinstance(files, str) else files[0]
    for ext, b in LOCAL_BUILDERS.items():
        if first.endswith(ext):
            return b
    raise DataError(f"dataset.data_files `{first}`: unsupported file type")


