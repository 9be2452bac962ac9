"""What defines a run, recorded in its run directory, so that resuming never mixes two runs in one.

`run.json` in the run directory holds the resolved training config and a fingerprint of each data source
(`datasets`, `eval_datasets`): for a local file its size, modification time and manifests.file_fingerprint
(a hash of all of it up to 64 MiB, else of 16 evenly spaced 1 MiB blocks, so that multi-GB files cost 16 MiB
of reading); for a save_to_disk directory the same of each of its files; a hub data set by its name only.
`resume=true` and `resume_from=` compare this launch with it before any model is loaded (`check_resume`):
- keys in SAFE_KEYS may change (one log line each);
- keys in LAUNCH_KEYS say how this launch runs, not what it trains, and are not compared;
- any other changed key, or a data source whose size or hash changed, stops the launch with one line naming
  each change, old and new, and how to go on; `resume_allow_changes=[key,...]` (`datasets` for changed data)
  continues on purpose: logged, and appended to the record's `changes`.
A data file whose modification time changed but whose size and hash did not (a copy) is the same data (a log
line says so). Keys added to or removed from the config since the record was written are logged, not refused.
"""
import json
import os
import time
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

import data_sources
import manifests

RECORD = 'run.json'
# may change when a run is continued: its length, how often it evaluates and checkpoints, what it logs
SAFE_KEYS = ('n_epochs', 'n_examples', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'finished_run_keeps',
             'wandb', 'minimum_log_interval_secs', 'sample_during_eval', 'n_eval_model_samples')
# how this launch runs (where, which checkpoint, with what trust and timeouts): never part of the comparison
LAUNCH_KEYS = ('resume', 'resume_from', 'resume_allow_changes', 'local_run_dir', 'local_dirs', 'trust_checkpoint_code',
               'fsdp_port', 'collective_timeout_s', 'slow_phase_timeout_s')
DATA_KEY = 'datasets'  # what resume_allow_changes names to continue on changed data


class RunMismatch(ValueError):
    """This launch would continue a run with other settings or other data; the message is one line."""


def _matches(key: str, names) -> bool:
    return any(key == name or key.startswith(name + '.') for name in names)


def _flat(node: Dict, prefix: str = '') -> Dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def flat_config(config: DictConfig) -> Dict:
    """{dotted key: value} of the resolved config, lists as values, without LAUNCH_KEYS. A value that names an
    installed package's directory (`${pkg_dir:...}`, e.g. model=smollm2-135m's GGUF) is kept unresolved: the same
    model read from another virtual environment (a fresh clone) is the same run."""
    resolved = _flat(OmegaConf.to_container(config, resolve=True))
    raw = _flat(OmegaConf.to_container(config, resolve=False))
    where_installed = {k for k, v in raw.items() if isinstance(v, str) and v.startswith('${pkg_dir:')}
    return {k: raw[k] if k in where_installed else v for k, v in resolved.items() if not _matches(k, LAUNCH_KEYS)}


def data_fingerprint(name: str) -> Optional[Dict]:
    """How a data source is recognised (see the module docstring); None for a hub data set or a name that
    is not a readable local file or directory (the data loader reports it)."""
    try:
        kind, path, _ = data_sources.resolve(name)
    except data_sources.DataError:
        return None
    try:
        if kind == 'file' and os.path.isfile(path):
            return {**manifests.file_fingerprint(path), 'mtime_ns': os.stat(path).st_mtime_ns}
        if kind == 'disk':
            files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
            return {os.path.relpath(f, path): manifests.file_fingerprint(f) for f in files}
    except OSError:
        return None
    return None


def describe(config: DictConfig) -> Dict:
    """The record of a run: {'config': flat config, 'data': {source: fingerprint}}."""
    names = list(config.datasets) + list(config.eval_datasets or [])
    return {'config': flat_config(config), 'data': {name: data_fingerprint(name) for name in names}}


def _shown(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _data_change(name: str, old, new) -> Optional[str]:
    """How a data source differs ('size 4567 -> 4890 bytes'), or None if it is the same data."""
    if not (old and new and 'size' in old and 'size' in new):  # a directory's files, or a source not found
        return None if old == new else f'data {name} changed (its files differ, or it is gone)'
    if old['size'] != new['size']:
        return f'data {name} changed: size {old["size"]} -> {new["size"]} bytes'
    if {k: v for k, v in old.items() if k != 'mtime_ns'} != {k: v for k, v in new.items() if k != 'mtime_ns'}:
        return f'data {name} changed: same size ({new["size"]} bytes), other contents (sha256 differs)'
    return None


def differences(old: Dict, new: Dict) -> Tuple[List[Tuple[str, str]], List[str]]:
    """([(key or DATA_KEY, 'what changed')], [log lines about added/removed keys and touched files])."""
    changes, notes = [], []
    old_config, new_config = old.get('config', {}), new['config']
    for key in sorted(set(old_config) | set(new_config)):
        if key not in old_config:
            notes.append(f'resume: {key} is new since this run was recorded (now {_shown(new_config[key])})')
        elif key not in new_config:
            notes.append(f'resume: {key} (was {_shown(old_config[key])}) is no longer a config key')
        elif old_config[key] != new_config[key]:
            changes.append((key, f'{key} {_shown(old_config[key])} -> {_shown(new_config[key])}'))
    for name, fingerprint in new['data'].items():
        if name not in old.get('data', {}):
            continue  # a new entry of `datasets`: reported as a change of that key
        change = _data_change(name, old['data'][name], fingerprint)
        if change:
            changes.append((DATA_KEY, change))
        elif fingerprint and old['data'][name] and fingerprint.get('mtime_ns') != old['data'][name].get('mtime_ns'):
            notes.append(f'resume: data {name} has a new modification time but the same size and hash; the same data')
    return changes, notes


def record(config: DictConfig, history: Optional[List] = None):
    """Write run.json (atomically) for a run that starts, or continues with recorded changes."""
    path = os.path.join(config.local_run_dir, RECORD)
    with open(path + '.tmp', 'w') as f:
        json.dump({**describe(config), 'changes': history or []}, f, indent=1, default=str)
    os.replace(path + '.tmp', path)


def check_resume(config: DictConfig, checkpoint: str) -> List[str]:
    """Before continuing `checkpoint` in config.local_run_dir: compare this launch with run.json (see the
    module docstring); raise RunMismatch, or log what changed, update the record and return the changed
    keys. A run recorded by an older version (no run.json) is recorded now."""
    run_dir, path = config.local_run_dir, os.path.join(config.local_run_dir, RECORD)
    if not os.path.exists(path):
        print(f'resume: {run_dir} has no {RECORD} (a run of an older version); recording this launch\'s settings',
              flush=True)
        record(config)
        return []
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise RunMismatch(f'resume: cannot read {path} ({e}); it records what defines the run: restore it, or start '
                          f'a new run (a new exp_name or local_run_dir)') from None
    changes, notes = differences(old, describe(config))
    allowed = list(config.get('resume_allow_changes') or [])
    refused = [what for key, what in changes if not _matches(key, SAFE_KEYS) and not _matches(key, allowed)]
    how, apart = ((f'resume_from={config.resume_from}', f'start a new run without resume_from= (model.archive='
                   f'{os.path.join(checkpoint, "policy.pt")} starts it from those weights)') if config.resume_from else
                  ('resume=true', 'start a new run with a new exp_name or local_run_dir'))
    if refused:
        keys = sorted({key for key, what in changes if what in refused})
        raise RunMismatch(f'{how}: this launch differs from the run in {run_dir} (recorded in {RECORD}): '
                          f'{"; ".join(refused)}. To continue that run anyway, add resume_allow_changes=[{",".join(keys)}]; '
                          f'to keep it apart, {apart}')
    for note in notes:
        print(note, flush=True)
    for key, what in changes:
        reason = 'safe to change' if _matches(key, SAFE_KEYS) else 'resume_allow_changes'
        print(f'resume: continuing {checkpoint} with {what} ({reason})', flush=True)
    if changes or notes:
        history = old.get('changes', []) + ([{'time': time.strftime('%Y-%m-%d %H:%M:%S'), 'checkpoint': checkpoint,
                                              'changes': [what for _, what in changes]}] if changes else [])
        record(config, history)
    return [key for key, _ in changes]
