"""Loading a dataset split: a hub id, a local json/jsonl/parquet/csv file (optionally gzipped), a
directory, a saved `datasets` Dataset or DatasetDict, or `data_files` (a file, glob, list, or a
mapping split -> files). Every failure is a one-line `DataError` naming the source."""
from __future__ import annotations

from pathlib import Path

from jaxpref.errors import DataError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(ds_cfg, split: str | None = None):
    """A `datasets.Dataset` for the configured source and split."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    split = split or ds_cfg.split
    name = ds_cfg.name
    path = Path(name).expanduser() if name else None
    try:
        if ds_cfg.data_files:
            builder = name if name in ("json", "csv", "parquet") else _builder_for(ds_cfg.data_files)
            return datasets.load_dataset(builder, data_files=ds_cfg.data_files, split=split)
        if path is not None and path.is_file():
            # `.gz`: datasets decompresses it; the type is the suffix before it.
            ext = path.suffixes[-2] if len(path.suffixes) > 1 and path.suffix == ".gz" else path.suffix
            builder = LOCAL_BUILDERS.get(ext)
            if builder is None:
                raise DataError(f"dataset `{name}`: unsupported file type `{path.suffix}` "
                                f"(use one of {', '.join(LOCAL_BUILDERS)}, optionally gzipped)")
            if path.stat().st_size == 0:
                raise DataError(f"dataset `{name}` is empty (0 bytes)")
            _only_train(name, split, "is one file")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path is not None and path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                d = datasets.load_from_disk(str(path))
                if isinstance(d, datasets.DatasetDict):
                    if split not in d:
                        raise DataError(f"dataset `{name}`: no split `{split}` (splits: {', '.join(d)})")
                    return d[split]
                _only_train(name, split, "is one saved Dataset, not a DatasetDict")
                return d
            return datasets.load_dataset(str(path), split=split)
        if name.startswith(("/", "./", "../", "~")) or name.endswith(tuple(LOCAL_BUILDERS)):
            raise DataError(f"dataset `{name}` not found (no such file or directory)")
        return datasets.load_dataset(name, ds_cfg.config_name, split=split, revision=ds_cfg.revision)
    except DataError:
        raise
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "split" in msg.lower():
            raise DataError(f"dataset `{name}`: no split `{split}` ({msg})")
        raise DataError(f"dataset `{name}`: {msg}")
    except Exception as e:
        kind = type(e).__name__
        if "NotFound" in kind or "Connection" in kind or "Offline" in kind or "HTTP" in kind or "Timeout" in kind:
            raise DataError(f"dataset `{name}` cannot be fetched from the Hugging Face hub ({kind}); "
                            "a local json/jsonl/parquet/csv file or directory works as `dataset.name`")
        raise DataError(f"dataset `{name}`: cannot load ({kind}: {str(e).splitlines()[0] if str(e) else ''})")


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


