"""Where preference rows come from: local files (.jsonl, .jsonl.gz, .json, .parquet), directories written by
`datasets`' save_to_disk, and Hugging Face hub data sets by id (`owner/name[:split]`), each row with its
location ('file:line', 'file: row i') so that a bad row or file is reported where it is.

Kept apart from preference_datasets.py, which turns rows into examples: this module knows files, encodings
and the hub, not preference formats.
"""
import gzip
import json
import os
import re
import zlib
from typing import Iterator, Optional, Tuple

REFERENCE_DATASETS = ('hh', 'shp', 'se')  # the reference's hub data sets, parsed by preference_datasets
LOCAL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.json', '.parquet')
HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


class DataError(ValueError):
    """Bad input data; the message names the file (or data set) and line (or row)."""


def load_hub(path: str, name: str, cache_dir: Optional[str], **kwargs):
    """datasets.load_dataset(path, ...); without the hub, at once the local HF cache or a clear DataError."""
    import datasets

    import model_loading
    if not model_loading.hub_reachable():
        os.environ['HF_HUB_OFFLINE'] = '1'  # use the local HF cache only, without minutes of retries
    try:
        return datasets.load_dataset(path, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        stem = name.replace('/', '_').replace(':', '-')
        raise DataError(
            f"cannot load data set {name!r} ({path}) from the Hugging Face hub or its local cache: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. "
            f"Offline, download it elsewhere and name the local file or directory instead, e.g. "
            f"datasets=[/path/to/{stem}.jsonl] (one JSON object per line: 'prompt'/'chosen'/'rejected', or HH-format "
            f"'chosen'/'rejected' dialogues), or a directory written by datasets' save_to_disk. See README 'Data'.") from e


def _looks_local(path: str) -> bool:
    first = path.split('/', 1)[0]
    return path.startswith(('/', './', '../', '~')) or (first != path and os.path.isdir(first))


def resolve(name: str) -> Tuple[str, str, Optional[str]]:
    """(kind, path, split) of a `datasets=[...]` entry; kind is 'reference' (hh, shp, se), 'file', 'disk'
    (a save_to_disk directory) or 'hub'. A trailing ':split' selects a split of a hub data set or of a
    saved DatasetDict (a hub id without one means 'train')."""
    if name in REFERENCE_DATASETS:
        return 'reference', name, None
    path, split = name, None
    if not os.path.exists(name) and ':' in name:
        head, tail = name.rsplit(':', 1)
        if tail and '/' not in tail:
            path, split = head, tail
    if os.path.isdir(path):
        return 'disk', path, split
    if path.endswith(LOCAL_SUFFIXES) or os.path.exists(path) or _looks_local(path):
        return 'file', path, split
    if HUB_ID.match(path):
        return 'hub', path, split or 'train'
    raise DataError(f"unknown dataset {name!r}: valid names are {', '.join(REFERENCE_DATASETS)}, a local file ending "
                    f"in {', '.join(LOCAL_SUFFIXES)}, a directory written by datasets' save_to_disk, or a hub id "
                    f"owner/name[:split] (no such file: {os.path.abspath(name)})")


def is_local_file(name: str) -> bool:
    """Whether a name is a local data file (by its suffix; existing or not) or an existing directory."""
    try:
        kind, path, _ = resolve(name)
    except DataError:
        return False
    return kind == 'disk' or (kind == 'file' and path.endswith(LOCAL_SUFFIXES))


def fingerprint(name: str):
    """What identifies a data source's content for the tokenization cache: path, sizes and modification
    times of a file or of every file of a directory; a hub id by its name."""
    kind, path, split = resolve(name)
    if kind == 'file' and os.path.isfile(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    if kind == 'disk':
        files = []
        for root, _, names in sorted(os.walk(path)):
            for n in sorted(names):
                st = os.stat(os.path.join(root, n))
                files.append([os.path.relpath(os.path.join(root, n), path), st.st_size, st.st_mtime_ns])
        return [os.path.abspath(path), split, files]
    return name


def read_rows(name: str, cache_dir: Optional[str] = None) -> Iterator[Tuple[str, object]]:
    """(location, row) for each row of a local file, save_to_disk directory or hub data set. A row that
    cannot be decoded comes as a DataError in place of the row, for the caller to raise or skip; a file
    that cannot be read raises a DataError naming it."""
    kind, path, split = resolve(name)
    if kind == 'hub':
        rows = load_hub(path, name, cache_dir, split=split)
        yield from ((f'{name} row {i}', row) for i, row in enumerate(rows))
    elif kind == 'disk':
        yield from _read_saved(path, split)
    elif kind == 'file':
        if split is not None and os.path.isfile(path):
            raise DataError(f"{name}: a ':split' selects a split of a hub data set or a save_to_disk directory, "
                            f"not of a file")
        if not os.path.isfile(path):
            raise DataError(f'{path}: no such data file')
        if not path.endswith(LOCAL_SUFFIXES):
            raise DataError(f"{path}: unsupported data file type; use {', '.join(LOCAL_SUFFIXES)}, or a directory "
                            f"written by datasets' save_to_disk")
        reader = _read_parquet if path.endswith('.parquet') else _read_json if path.endswith('.json') else _read_jsonl
        yield from reader(path)
    else:
        raise DataError(f'{name}: a hub data set of the reference, not rows')


def _read_jsonl(path: str) -> Iterator[Tuple[str, object]]:
    line_no = 0
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            for line_no, raw in enumerate(f, 1):
                where = f'{path}:{line_no}'
                try:
                    text = raw.decode('utf-8-sig' if line_no == 1 else 'utf-8')
                except UnicodeDecodeError as e:
                    yield where, DataError(f'{where}: invalid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); '
                                           f'data files must be UTF-8')
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    row = DataError(f'{where}: malformed JSON ({e.msg})')
                yield where, row
    except gzip.BadGzipFile as e:
        if line_no == 0:
            raise DataError(f'{path}: not a gzip file, although its name ends in .gz ({e})') from None
        raise DataError(f'{path}: corrupt gzip data after line {line_no} ({e})') from None
    except (EOFError, zlib.error) as e:
        raise DataError(f'{path}: truncated or corrupt gzip file: it ends after line {line_no} ({e})') from None
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror or e})') from None


def _read_json(path: str) -> Iterator[Tuple[str, object]]:
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror or e})') from None
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise DataError(f'{path}:{line}: invalid UTF-8 (byte {data[e.start]:#04x}); data files must be UTF-8') from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f'{path}:{e.lineno}: malformed JSON ({e.msg})') from e
    if not isinstance(rows, list):
        raise DataError(f'{path}: a .json data file must hold a list of objects')
    yield from ((f'{path}: item {i}', r) for i, r in enumerate(rows))


def _read_parquet(path: str) -> Iterator[Tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet as pq
    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield f'{path}: row {i}', row
                i += 1
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: not a readable Parquet file (at row {i}: {str(e).splitlines()[0]})') from None


def _read_saved(path: str, split: Optional[str]) -> Iterator[Tuple[str, object]]:
    """Rows of a directory written by datasets' save_to_disk (a Dataset, or a DatasetDict and a split)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in ('state.json', 'dataset_dict.json')):
        raise DataError(f"{path}: a directory, not a data file, and not one written by datasets' save_to_disk "
                        f"(it has no state.json or dataset_dict.json)")
    import datasets
    try:
        data = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: cannot load this save_to_disk directory ({str(e).splitlines()[0]})") from None
    where = path
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise DataError(f"{path}: holds the splits {', '.join(data)}; name one as {path}:SPLIT")
        data, where = data[split], f'{path}:{split}'
    elif split is not None:
        raise DataError(f'{path}: holds a single data set, not splits; drop the :{split}')
    yield from ((f'{where}: row {i}', row) for i, row in enumerate(data))
