"""The tokenized-data cache under `<local_dirs>/tokenized/`: examples are tokenized once and written as a
safetensors file (token ids and UTF-8 text in flat tensors with offsets, a JSON header). Loading it parses
numbers and text and never runs code, unlike the pickle it replaces; a file that is not a valid cache
(damaged, or planted) is reported in one line and rebuilt. Processes that arrive at once at a missing
entry (torchrun ranks, two jobs on a node) take an OS file lock: one builds it, the others wait and read.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import socket
from typing import Callable, List, Tuple

import torch

FORMAT = 'tdpo-tokenized-examples'
FORMAT_VERSION = '1'
FIELDS = ('prompt', 'chosen', 'rejected')


class CacheError(ValueError):
    """A cache file that is not a valid cache of examples."""


def key(parts) -> str:
    """Cache key of everything the examples depend on (a JSON-serialisable list)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _flat(seqs: List[List[int]], dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    return torch.tensor([x for s in seqs for x in s], dtype=dtype), torch.tensor(offsets, dtype=torch.int64)


def save(path: str, examples: List, notes: List[str]):
    """Write examples (objects with prompt/chosen/rejected texts and *_ids) atomically to `path`."""
    tensors = {}
    for field in FIELDS:
        ids = [getattr(e, f'{field}_ids') for e in examples]
        if field == 'rejected' and any(i is None for i in ids):
            continue  # SFT examples have no rejected response
        tensors[f'{field}_ids'], tensors[f'{field}_ids_offsets'] = _flat(ids, torch.int32)
        texts = [list(getattr(e, field).encode('utf-8')) for e in examples]
        tensors[f'{field}_text'], tensors[f'{field}_text_offsets'] = _flat(texts, torch.uint8)
    from safetensors.torch import save_file
    # created with the user's umask; a random name, so that concurrent writers never share a file
    tmp = f'{path}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}'
    try:
        save_file(tensors, tmp, metadata={'format': FORMAT, 'version': FORMAT_VERSION, 'count': str(len(examples)),
                                          'notes': json.dumps(notes)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sequences(tensors, name: str, n: int, bound: int) -> List:
    values, offsets = tensors[name], tensors[f'{name}_offsets']
    if offsets.dtype != torch.int64 or offsets.shape != (n + 1,) or values.dim() != 1:
        raise CacheError(f'{name}: wrong shape')
    offsets = offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != len(values) or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise CacheError(f'{name}: inconsistent offsets')
    if values.dtype == torch.uint8:
        data = values.numpy().tobytes()
        return [data[a:b].decode('utf-8') for a, b in zip(offsets, offsets[1:])]
    if values.dtype != torch.int32 or (len(values) and not 0 <= int(values.min()) <= int(values.max()) < bound):
        raise CacheError(f'{name}: token ids outside the vocabulary')
    values = values.tolist()
    return [values[a:b] for a, b in zip(offsets, offsets[1:])]


def load(path: str, make_example: Callable, vocab_size: int) -> Tuple[List, List[str]]:
    """(examples, notes) of a cache file; CacheError (or the parser's error) if it is not a valid one."""
    from safetensors import safe_open
    with safe_open(path, 'pt') as f:
        metadata = f.metadata() or {}
        if metadata.get('format') != FORMAT or metadata.get('version') != FORMAT_VERSION:
            raise CacheError(f"not a {FORMAT} v{FORMAT_VERSION} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    n = int(metadata['count'])
    columns = {}
    for field in FIELDS:
        if field == 'rejected' and 'rejected_ids' not in tensors:
            columns['rejected'] = columns['rejected_ids'] = [None] * n
            continue
        columns[f'{field}_ids'] = _sequences(tensors, f'{field}_ids', n, vocab_size)
        columns[field] = _sequences(tensors, f'{field}_text', n, 256)
    examples = [make_example(**{k: v[i] for k, v in columns.items()}) for i in range(n)]
    return examples, json.loads(metadata.get('notes', '[]'))


@contextlib.contextmanager
def _exclusive(lock_path: str, say: Callable[[str], None]):
    """An OS lock (flock) on lock_path for the block; released when the process ends, however it ends.
    Where locks are unavailable (some network file systems), the block runs unlocked: writes stay atomic.
    The lock file is removed after the block: a process still waiting on it then finds the entry written
    (or, if the block failed, builds it again, perhaps beside a newcomer: duplicate work, never a torn file)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o666)
    except OSError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f'waiting for another process to finish the tokenized-data cache ({lock_path})')
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.remove(lock_path)
            os.close(fd)


def load_or_build(directory: str, cache_key: str, build: Callable[[], Tuple[List, List[str]]],
                  make_example: Callable, vocab_size: int, say: Callable[[str], None] = print,
                  warn: Callable[[str], None] = print) -> Tuple[List, List[str]]:
    """(examples, notes) from `<directory>/<cache_key>.safetensors`, or from build() (then written there)."""
    path = os.path.join(directory, f'{cache_key}.safetensors')
    if os.path.exists(path):
        try:
            return load(path, make_example, vocab_size)
        except Exception:
            pass  # looked at again under the lock below, and reported there
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        warn(f'warning: cannot create the tokenized-data cache directory {directory} ({e.strerror}); '
             f'tokenizing without a cache')
        return build()
    with _exclusive(os.path.join(directory, f'{cache_key}.lock'), say):
        if os.path.exists(path):  # another process built it while this one waited
            try:
                return load(path, make_example, vocab_size)
            except Exception as e:
                warn(f'warning: ignoring {path}: not a valid tokenized-data cache '
                     f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); tokenizing again')
        examples, notes = build()
        try:
            save(path, examples, notes)
        except OSError as e:
            warn(f'warning: could not write the tokenized-data cache {path} ({e.strerror or e}); continuing without it')
        return examples, notes
