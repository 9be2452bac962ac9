"""Manifests of cache entries: files first, a manifest of their sizes and hashes last, verified on every read, so
that no cache entry (the model cache, the demo's and recipes' generated pairs, evaluation results, a run's hf/
export) is trusted because it exists. `write_manifest` seals an entry, `manifest_problem` says what is damaged,
`file_fingerprint` is the hash both use (and run_identity.py's data fingerprints). Shell recipes use
`python checkpoints.py verify MANIFEST`."""
import json
import os
from typing import Dict, List, Optional

import utils

HASHED_WHOLE = 64 * 2**20   # files up to this size are hashed whole; larger ones at SAMPLES evenly spaced blocks
SAMPLES, SAMPLE_BYTES = 16, 2**20


def file_fingerprint(path: str) -> Dict:
    """{'size', 'sha256'} of a file: the hash of all of it up to HASHED_WHOLE bytes, else ('sampled_sha256') of
    SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets, first and last included (16 MiB read whatever the
    size: a truncation, an append or a damaged block there is seen; a change elsewhere in a large file is not)."""
    import hashlib
    size, digest = os.path.getsize(path), hashlib.sha256()
    with open(path, 'rb') as f:
        if size <= HASHED_WHOLE:
            for block in iter(lambda: f.read(2**20), b''):
                digest.update(block)
            return {'size': size, 'sha256': digest.hexdigest()}
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return {'size': size, 'sampled_sha256': digest.hexdigest()}


def write_manifest(manifest_path: str, paths: List[str], extra: Optional[Dict] = None):
    """Seal a cache entry: flush `paths` (files, or directories: every file in them) to disk, then write
    `manifest_path` (atomically, last) with each file's path relative to the manifest's directory and its
    `file_fingerprint`, and the entries of `extra` (what the entry was made from, e.g.) beside 'files'. Call it
    after the entry's files are complete; `manifest_problem` verifies it on read."""
    base, files = os.path.dirname(os.path.abspath(manifest_path)), {}
    for path in paths:
        walked = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names] if os.path.isdir(path) else [path]
        for file in sorted(walked):
            if os.path.abspath(file) == os.path.abspath(manifest_path):
                continue  # the previous manifest of an entry written again
            utils.fsync_path(file)
            files[os.path.relpath(os.path.abspath(file), base)] = file_fingerprint(file)
    tmp = f'{manifest_path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump({**(extra or {}), 'files': files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest_path)
    utils.fsync_path(base)


def manifest_problem(manifest_path: str) -> Optional[str]:
    """None if the entry that `write_manifest` sealed is intact: every file it lists exists with its size
    and hash. Otherwise why not, naming the file, e.g. 'model.safetensors is 1024 bytes, its manifest says
    538090408' or 'no manifest.json (an interrupted write, or written by an older version)'."""
    base = os.path.dirname(os.path.abspath(manifest_path))
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if isinstance(manifest, dict) and 'files' not in manifest:
            return f'{os.path.basename(manifest_path)} lists no files (written by an older version)'
        files = dict(manifest['files'])
    except FileNotFoundError:
        return f'no {os.path.basename(manifest_path)} (an interrupted write, or written by an older version)'
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f'{os.path.basename(manifest_path)} is unreadable ({utils.first_line(e)})'
    for name, want in files.items():  # sizes first: cheap
        file = os.path.join(base, name)
        if not os.path.isfile(file):
            return f'{name} is missing'
        if os.path.getsize(file) != want.get('size'):
            return f'{name} is {os.path.getsize(file)} bytes, its manifest says {want.get("size")}'
    for name, want in files.items():
        if file_fingerprint(os.path.join(base, name)) != want:
            return f'{name} has the size its manifest says but other contents (its sha256 differs)'
    return None
