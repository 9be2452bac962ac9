"""Checkpoints: how a run's state is written, verified, found and loaded.

The trainer decides *what* a checkpoint holds (its hooks give state dicts on every rank layout); this
module decides *how* it is written, checked and found, so that a run never loses work:
- `save` writes `<dir>.tmp-<pid>/`, then `manifest.json` (every file and its size) last, then renames
  it into place: a directory with a manifest that matches its files is complete. A full disk removes
  the partial directory and stops with one line (`DiskFullError`).
- `find_latest` / `resume_point` pick the newest checkpoint that verifies, say which were skipped and
  why, and recover a checkpoint left under a temporary name by a save killed between its renames.
- `load_file` loads with `weights_only=True`: tensors, numbers, strings and containers only. A file
  that needs code to unpickle is refused with one line naming it and `trust_checkpoint_code`.
- `export_hf` writes the policy in Hugging Face format at the end of a run, its manifest last.
- `save_trainer`, `load_trainer_model_state`, `resume_trainer`, `export_trainer_hf`: what BasicTrainer's `save`,
  `load_model_state`, `load_training_state` and `export_hf` do, with the trainer passed in.
Elsewhere: the run directory's lock (run_dirs.py), cache manifests (manifests.py), RNG state (utils.py).
Never imports trainers.py.
"""
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: torch.distributed.checkpoint's

import disk
import distributed
import lora
import manifests
import run_logging
import utils

TRAINING_STATE = 'training_state.pt'  # counters, RNG states, wandb run id: what resuming needs besides weights
MANIFEST = 'manifest.json'            # written last: {'step': examples seen, 'files': {relative path: bytes}}
SHARDED = 'sharded'                   # torch.distributed.checkpoint directory of the sharded trainers
TRUST_KEY = 'trust_checkpoint_code'   # the config key that allows loading files that run code
CANDIDATE = re.compile(r'(step-\d+|LATEST)(?:\.(tmp|old)-\d+)?')  # checkpoint names, with interrupted-save leftovers


class CheckpointError(RuntimeError):
    """A checkpoint or run-directory problem; the message is one line for the user."""


class UnsafeCheckpointError(CheckpointError):
    """A file that would run code when unpickled, and trust_checkpoint_code is off."""


class DiskFullError(CheckpointError):
    """A write ran out of space (a checkpoint; the model cache, model_loading.py); the partial directory was removed.
    The one error of a full disk: a CheckpointError, so that what stops on one line for a damaged checkpoint
    stops the same way for a full disk."""


class Unverified(Exception):
    """A checkpoint directory that is not complete or not intact; the message says why."""


# --------------------------------------------------------------------------------------------------
# Loading without running code
# --------------------------------------------------------------------------------------------------

def load_file(path: str, trust: bool = False, mmap: bool = False):
    """torch.load of a checkpoint file with weights_only=True; `mmap` maps tensors instead of reading
    them (zip-format files; a cheap way to check a file). A file that needs code to unpickle raises
    UnsafeCheckpointError unless `trust` (trust_checkpoint_code=true); an unreadable one CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' not in str(e):
            raise CheckpointError(f'{path}: cannot be read ({utils.first_line(e)})') from None
        if not trust:
            culprit = re.search(r'GLOBAL (\S+)', str(e))
            needs = f'it needs {culprit.group(1)}' if culprit else 'it holds more than tensors and plain containers'
            raise UnsafeCheckpointError(f'refusing to load {path}: unpickling it could run code ({needs}); if you '
                                        f'trust this file, set {TRUST_KEY}=true to load it anyway') from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f'{path}: cannot be read ({utils.first_line(e)})') from None
    print(f'{TRUST_KEY}=true: loading {path} with full unpickling (it can run code)', flush=True)
    return torch.load(path, map_location='cpu', weights_only=False)  # the documented opt-in, and only here


def load_archive(path: str, trust: bool = False, mmap: bool = False) -> Dict:
    """A policy.pt in the reference's format {'step_idx', 'state', 'metrics'} (ours, or the reference
    code's, written by plain torch.save)."""
    archive = load_file(path, trust, mmap)
    if not isinstance(archive, dict) or not isinstance(archive.get('state'), dict):
        raise CheckpointError(f"{path}: not a policy.pt archive (a dict with 'step_idx', 'state', 'metrics')")
    return archive


def load_state(path: str, trust: bool = False):
    """The 'state' of one reference-format file (policy.pt, optimizer.pt, scheduler.pt)."""
    return load_archive(path, trust)['state']


def load_training_state(checkpoint_dir: str, trust: bool = False) -> Dict:
    return load_file(os.path.join(checkpoint_dir, TRAINING_STATE), trust)


# --------------------------------------------------------------------------------------------------
# Writing: a temporary directory, the manifest last, then a rename
# --------------------------------------------------------------------------------------------------

def save(path: str, step: int, files: Dict[str, Dict], training_state: Dict, metrics: Optional[Dict] = None,
         sharded: Optional[Dict] = None, rank: int = 0, world_size: int = 1):
    """Write checkpoint directory `path`: each of `files` (name -> state dict) as the reference's
    {'step_idx', 'state', 'metrics'} and training_state.pt, from rank 0; `sharded` (a state dict of
    DTensors) with torch.distributed.checkpoint from every rank. All ranks call it. The directory
    appears only complete, with its manifest."""
    with _atomic_directory(path, step, rank, world_size) as tmp:
        if sharded is not None:
            import torch.distributed.checkpoint as dcp
            dcp.save(sharded, checkpoint_id=os.path.join(tmp, SHARDED), process_group=distributed.slow_group())
        if rank == 0:
            for name, state in files.items():
                torch.save({'step_idx': step, 'state': state, 'metrics': metrics or {}}, os.path.join(tmp, name))
            torch.save(training_state, os.path.join(tmp, TRAINING_STATE))


def _gather(value, world_size: int) -> list:
    """Every rank's value; bounded by slow_phase_timeout_s, as ranks wait here while rank 0 writes."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    dist.all_gather_object(values, value, group=distributed.slow_group())
    return values


@contextlib.contextmanager
def _atomic_directory(path: str, step: int, rank: int, world_size: int):
    """Yield a temporary directory (the same on every rank) that replaces `path` once every rank's block
    completed and rank 0 wrote the manifest. On an error on any rank the partial directory is removed and
    every rank raises (a full disk: DiskFullError). A kill inside the block leaves only `<path>.tmp-<pid>`.
    Collectives in the block must come before any rank's own writes, so that all ranks reach them."""
    tmp = _gather(f'{path}.tmp-{os.getpid()}', world_size)[0]  # rank 0's name
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            error = e
    if _gather(error is not None, world_size)[0]:  # also the barrier: the directory exists
        _fail(path, tmp, error, rank, [(0, utils.first_line(error) if error else 'cannot create the directory')])
    try:
        yield tmp
        if rank == 0:
            _write_manifest(tmp, step)
    except (Exception, CheckpointException) as e:  # not KeyboardInterrupt: like a kill, it leaves the partial directory
        if distributed.collective_failure(e) is not None:
            raise  # a rank stopped answering: no rank can agree on cleaning up; `<path>.tmp-<pid>` stays, unused
        error = e
    messages = _gather(error and utils.first_line(list(_causes(error))[-1]), world_size)
    failures = [(r, message) for r, message in enumerate(messages) if message]
    if failures:
        _fail(path, tmp, error, rank, failures)
    if rank == 0:
        _install(tmp, path)
    _gather(None, world_size)  # no rank moves on before the checkpoint exists


def _fail(path: str, tmp: str, error: Optional[BaseException], rank: int, failures: List[Tuple[int, str]]):
    """Remove the partial directory (rank 0) and raise on every rank: one line for the user on rank 0."""
    if rank != 0:
        raise CheckpointError(f'writing checkpoint {path} failed') from error
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    shutil.rmtree(tmp, ignore_errors=True)
    if disk.looks_like_disk_full(_causes(error), free) or any('No space left' in m for _, m in failures):
        raise DiskFullError(f'disk full while writing checkpoint {path} ({free / 2**20:.0f} MiB free there); '
                            f'removed the partial {os.path.basename(tmp)}; the previous checkpoints are intact: '
                            f'free space, then rerun with resume=true') from error
    if isinstance(error, OSError):
        raise CheckpointError(f'cannot write checkpoint {path}: {error}; removed the partial '
                              f'{os.path.basename(tmp)}') from error
    if error is not None:
        raise error
    raise CheckpointError(f'writing checkpoint {path} failed on rank {failures[0][0]}: {failures[0][1]}')


def _causes(error: Optional[BaseException]):
    """An exception, what caused it, and the per-rank exceptions of a torch.distributed.checkpoint failure."""
    for cause in disk.exception_chain(error):
        yield cause
        if isinstance(cause, CheckpointException):
            for failure, _ in cause.failures.values():
                yield from _causes(failure)


def _write_manifest(directory: str, step: int):
    """Flush every file to disk, then write the manifest of their sizes (last: it marks completeness)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            file = os.path.join(root, name)
            utils.fsync_path(file)
            files[os.path.relpath(file, directory)] = os.path.getsize(file)
        utils.fsync_path(root)
    with open(os.path.join(directory, MANIFEST), 'w') as f:
        json.dump({'step': step, 'files': dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    utils.fsync_path(directory)


def _install(tmp: str, path: str):
    """Rename the complete `tmp` to `path`, replacing an existing `path`. A kill between the two renames
    of a replacement leaves `<path>.old-<pid>` and `tmp`, both complete; `resume_point` recovers them."""
    if os.path.lexists(path):
        old = f'{path}.old-{os.getpid()}'
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    utils.fsync_path(os.path.dirname(os.path.abspath(path)))


# --------------------------------------------------------------------------------------------------
# Verifying and finding
# --------------------------------------------------------------------------------------------------

def verify(directory: str) -> int:
    """The step (examples seen) of a complete checkpoint: its manifest lists every file with the size it
    has. Raises Unverified with the reason otherwise. Reads no file but the manifest."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
        step, files = int(manifest['step']), dict(manifest['files'])
    except FileNotFoundError:
        raise Unverified(f'no {MANIFEST} (an interrupted write, or written by an older version)') from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Unverified(f'{MANIFEST} is unreadable ({utils.first_line(e)})') from None
    for name, size in files.items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise Unverified(f'{name} is missing')
        if os.path.getsize(file) != size:
            raise Unverified(f'{name} is {os.path.getsize(file)} bytes, its manifest says {size}')
    return step


def check_loadable(directory: str, trust: bool = False):
    """Unpickle every .pt file of a checkpoint (tensors memory-mapped, so cheap) and the sharded metadata:
    raises Unverified if one cannot be read, UnsafeCheckpointError if one would run code."""
    names = [n for n in sorted(os.listdir(directory)) if n.endswith('.pt')]
    if TRAINING_STATE not in names:
        raise Unverified(f'{TRAINING_STATE} is missing')
    try:
        for name in names:
            load_file(os.path.join(directory, name), mmap=True)
        if os.path.isdir(os.path.join(directory, SHARDED)):
            _read_metadata(os.path.join(directory, SHARDED, '.metadata'))
    except UnsafeCheckpointError:
        if not trust:  # with trust, it is loaded (and its code run) once, when the trainer loads it
            raise
    except (CheckpointError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise Unverified(utils.first_line(e)) from None


def checkpoint_step(directory: str, trust: bool = False) -> int:
    """Examples seen at a checkpoint: from its manifest, or from training_state.pt of one written without."""
    try:
        return verify(directory)
    except Unverified:
        return load_training_state(directory, trust)['example_counter']


def _name_rank(name: str) -> int:
    """Among checkpoints of one step: a plain name before an unrenamed new one (.tmp) before an old one."""
    return {None: 2, 'tmp': 1, 'old': 0}[CANDIDATE.fullmatch(name).group(2)]


def find_latest(run_dir: str, trust: Optional[bool] = None) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(the newest checkpoint of a run directory that verifies, [(skipped checkpoint, why)]). Candidates
    are step-N/, LATEST/ and the leftovers of interrupted saves. With `trust` not None, the chosen one must
    also load (`check_loadable`); a newer one that does not is skipped."""
    if not os.path.isdir(run_dir):
        return None, []
    found, skipped = [], []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if CANDIDATE.fullmatch(name) and os.path.isdir(path):
            try:
                found.append((verify(path), _name_rank(name), path))
            except Unverified as e:
                skipped.append((path, str(e)))
    for _, _, path in sorted(found, reverse=True):
        if trust is None:
            return path, skipped
        try:
            check_loadable(path, trust)
            return path, skipped
        except Unverified as e:
            skipped.append((path, str(e)))
    return None, skipped


def latest_checkpoint(run_dir: str) -> Optional[str]:
    return find_latest(run_dir)[0]


# --------------------------------------------------------------------------------------------------
# Resuming (with the run directory locked)
# --------------------------------------------------------------------------------------------------

def resume_point(run_dir: str, trust: bool = False) -> Optional[str]:
    """The checkpoint that resume=true continues: the newest that verifies and loads, after printing
    every one skipped and why. A checkpoint left as `<name>.tmp-<pid>` or `<name>.old-<pid>` by a save
    killed between its renames gets its name back. None when the run has no checkpoint yet; an error
    when it has checkpoints and none can be loaded (starting over would overwrite them)."""
    best, skipped = find_latest(run_dir, trust)
    for path, reason in skipped:
        print(f'resume: skipped {path}: {reason}', flush=True)
    if best is None:
        if any(CANDIDATE.fullmatch(os.path.basename(path)).group(2) is None for path, _ in skipped):
            raise CheckpointError(f'resume=true: no checkpoint in {run_dir} can be loaded (reasons above); move '
                                  f'them away to start over, or name one with resume_from=')
        return None
    name = CANDIDATE.fullmatch(os.path.basename(best))
    final = os.path.join(run_dir, name.group(1))
    if name.group(2) and not os.path.lexists(final):
        os.replace(best, final)
        print(f'resume: {os.path.basename(best)} was left by an interrupted save; renamed it to {final}', flush=True)
        return final
    return best


def check_resume_from(checkpoint_dir: str, trust: bool = False) -> str:
    """A checkpoint named with resume_from=: it must verify (one written without a manifest, by an older
    version, is loaded unverified) and load."""
    try:
        verify(checkpoint_dir)
    except Unverified as e:
        if os.path.exists(os.path.join(checkpoint_dir, MANIFEST)):
            raise CheckpointError(f'resume_from={checkpoint_dir}: {e}') from None
        print(f'resume_from={checkpoint_dir}: {e}; loading it unverified', flush=True)
    try:
        check_loadable(checkpoint_dir, trust)
    except Unverified as e:
        raise CheckpointError(f'resume_from={checkpoint_dir}: {e}') from None
    return checkpoint_dir


def prune(run_dir: str, keep: Optional[int]):
    """Delete the leftovers of other processes' interrupted saves (the run directory is locked: they are
    dead), and all but the newest `keep` step-N/ checkpoints that verify (others are left alone)."""
    for name in os.listdir(run_dir):
        match = CANDIDATE.fullmatch(name)
        if match and match.group(2) and not name.endswith(f'-{os.getpid()}'):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    if keep:
        steps = []
        for name in os.listdir(run_dir):
            if re.fullmatch(r'step-\d+', name):
                with contextlib.suppress(Unverified):
                    steps.append((verify(os.path.join(run_dir, name)), name))
        for _, name in sorted(steps)[:-keep]:
            shutil.rmtree(os.path.join(run_dir, name))


FINISHED_RUN_KEEPS = ('all', 'weights', 'export')  # the values of finished_run_keeps (config/config.yaml)


def _manifest(directory: str) -> Dict:
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def finished_run_kept(checkpoint_dir: str) -> str:
    """What a finished run's `finish_run` left of this checkpoint: 'all' (everything, so training can go
    on), 'weights' or 'export' (no optimizer state)."""
    try:
        return _manifest(checkpoint_dir).get('kept', 'all')
    except (OSError, ValueError, AttributeError):
        return 'all'


def finish_run(run_dir: str, keeps: str):
    """Free what a finished run no longer needs, as finished_run_keeps says: 'weights' drops the optimizer
    state (optimizer.pt; the sharded trainers' sharded/ policy and optimizer shards, whose full policy is
    policy.pt) from every checkpoint; 'export' also drops LATEST/policy.pt, the same weights as the run's hf/
    export. step-N/policy.pt stays either way (evaluate.py reads it). Each checkpoint's manifest is rewritten
    first (atomically, listing what stays, with 'kept': keeps), then the files go: a kill in between leaves
    a checkpoint that verifies and files that a rerun removes."""
    if keeps == 'all':
        return
    for name in sorted(os.listdir(run_dir)):
        directory = os.path.join(run_dir, name)
        if not re.fullmatch(r'step-\d+|LATEST', name) or not os.path.isdir(directory):
            continue
        try:
            step = verify(directory)
        except Unverified:
            continue  # not a complete checkpoint: leave it as it is
        manifest = _manifest(directory)
        dropped = lambda file: (file == 'optimizer.pt' or file.startswith(SHARDED + os.sep)
                                or (keeps == 'export' and name == 'LATEST' and file == 'policy.pt'))
        kept = {file: size for file, size in manifest['files'].items() if not dropped(file)}
        with open(os.path.join(directory, MANIFEST + '.tmp'), 'w') as f:
            json.dump({'step': step, 'files': kept, 'kept': keeps}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(directory, MANIFEST + '.tmp'), os.path.join(directory, MANIFEST))
        for root, _, files in os.walk(directory):  # what is on disk: also what a kill left last time
            for file in files:
                if dropped(os.path.relpath(os.path.join(root, file), directory)):
                    os.remove(os.path.join(root, file))
        shutil.rmtree(os.path.join(directory, SHARDED), ignore_errors=True)


def export_hf(policy, full_state: Dict, tokenizer, run_dir: str, output_dir: str):
    """The policy in Hugging Face format (AutoModelForCausalLM.from_pretrained loads it) with its tokenizer in
    output_dir; with LoRA the adapter merged into it, and the adapter alone in <run dir>/adapter (lora.export).
    full_state: the policy's whole state dict (gathered, on a sharded policy). The manifest is written last."""
    if lora.is_lora(policy):
        adapter_dir, _ = lora.export(policy, full_state, run_dir, tokenizer, output_dir)
        utils.rank0_print(f'exported the LoRA adapter to {adapter_dir}')
    else:
        policy.save_pretrained(output_dir, state_dict=full_state)
        tokenizer.save_pretrained(output_dir)
    manifests.write_manifest(os.path.join(output_dir, MANIFEST), [output_dir])  # last: complete
    utils.rank0_print(f'exported the policy in Hugging Face format to {output_dir}')


# --------------------------------------------------------------------------------------------------
# A trainer's checkpoints: the bodies of BasicTrainer's save, load_model_state, load_training_state and export_hf
# (the trainer is passed in; its hooks say what a checkpoint holds)
# --------------------------------------------------------------------------------------------------

def save_trainer(trainer, output_dir: Optional[str], metrics: Optional[Dict], wandb_id: Optional[str]):
    """BasicTrainer.save: write checkpoint directory `output_dir` (default `<run_dir>/LATEST`) with `save`: the
    files of the trainer's `checkpoint_files` and training_state.pt (its RESUMED counters, the RNG states,
    `wandb_id`), appearing only complete; then prune old ones (rank 0)."""
    output_dir = output_dir or os.path.join(trainer.run_dir, 'LATEST')
    if (os.path.realpath(output_dir), trainer.example_counter) == trainer.loaded_checkpoint:
        return  # this state is the checkpoint just loaded: never rewrite it
    files, sharded = trainer.checkpoint_files()
    state = {**{key: getattr(trainer, key) for key in trainer.RESUMED}, 'rng': utils.rng_state(),
             'wandb_id': wandb_id}  # training_state.pt
    save(output_dir, trainer.example_counter, files, state, metrics, sharded, trainer.rank, trainer.world_size)
    if trainer.rank == 0:
        prune(trainer.run_dir, trainer.config.keep_checkpoints)


def load_trainer_model_state(trainer, checkpoint_dir: str):
    """BasicTrainer.load_model_state: policy, optimizer and scheduler from a checkpoint directory of `save_trainer`."""
    load = lambda name: load_state(os.path.join(checkpoint_dir, name), trainer.config.trust_checkpoint_code)
    # what policy_state_dict() returned; frozen weights stay as the model files gave them
    lora.load_trainable_state(trainer.policy, load('policy.pt'), 'the checkpoint\'s policy.pt')
    trainer.optimizer.load_state_dict(load('optimizer.pt'))
    trainer.scheduler.load_state_dict(load('scheduler.pt'))


def resume_trainer(trainer, checkpoint_dir: str):
    """BasicTrainer.load_training_state: continue from a checkpoint of `save_trainer`: the trainer's
    `load_model_state`, then its counters, data position and RNG; metrics.jsonl loses the lines logged after
    that checkpoint."""
    trainer.load_model_state(checkpoint_dir)
    state = load_training_state(checkpoint_dir, trainer.config.trust_checkpoint_code)
    for key in trainer.RESUMED:
        setattr(trainer, key, state[key])
    utils.set_rng_state(state['rng'])
    trainer.last_checkpoint = trainer.example_counter
    trainer.loaded_checkpoint = (os.path.realpath(checkpoint_dir), trainer.example_counter)
    if trainer.rank == 0:
        run_logging.truncate_metrics(trainer.metrics_path, trainer.example_counter)
    utils.rank0_print(f'resumed from {checkpoint_dir} after {trainer.example_counter} examples')


def export_trainer_hf(trainer, output_dir: Optional[str]):
    """BasicTrainer.export_hf: the policy in Hugging Face format with its tokenizer (default <run dir>/hf; export_hf)."""
    state = trainer.policy_state_dict(trainable_only=False)  # every rank takes part in gathering a sharded policy
    if trainer.rank == 0:
        export_hf(trainer.policy, state, trainer.tokenizer, trainer.run_dir,
                  output_dir or os.path.join(trainer.run_dir, 'hf'))


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint), loaded without running code
# --------------------------------------------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint pickles its .metadata: allow exactly the data classes it holds."""
    ALLOWED = {('torch.distributed.checkpoint.metadata', n) for n in (
        'Metadata', 'MetadataIndex', 'StorageMeta', 'TensorStorageMetadata', 'BytesStorageMetadata',
        'ChunkStorageMetadata', 'TensorProperties', '_MEM_FORMAT_ENCODING')} | {
        ('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'),
        ('torch.serialization', '_get_layout'), ('pathlib', 'PosixPath'), ('pathlib', 'PurePosixPath'),
        ('collections', 'OrderedDict')}

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or (module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f'refusing to load {self.path}: unpickling it could run code (it needs '
                                    f'{module}.{name}); if you trust this file, set {TRUST_KEY}=true to load it anyway')


def _read_metadata(path: str):
    with open(path, 'rb') as f:
        return _MetadataUnpickler(f, path).load()


def _safe_reader_and_planner(directory: str):
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = _read_metadata(str(self._get_metadata_path(kwargs.get('rank'))))
            if getattr(metadata, 'storage_meta', None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            """Non-tensor values (optimizer hyperparameters) are loaded weights_only, then handed on
            re-pickled from the values just loaded."""
            try:
                safe = torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                raise UnsafeCheckpointError(f'refusing to load {directory} ({read_item.dest_index.fqn}): unpickling '
                                            f'it could run code; if you trust this file, set {TRUST_KEY}=true to '
                                            f'load it anyway') from None
            buffer = io.BytesIO()
            torch.save(safe, buffer)
            buffer.seek(0)
            super().load_bytes(read_item, buffer)

    return Reader(directory), Planner()


def load_sharded(checkpoint_dir: str, state: Dict, trust: bool = False):
    """Load the sharded/ part of a checkpoint into `state` (DTensor state dicts, in place), on every rank;
    torch.distributed.checkpoint reshards to this run's number of ranks."""
    import torch.distributed.checkpoint as dcp
    directory = os.path.join(checkpoint_dir, SHARDED)
    try:
        if trust:
            dcp.load(state, checkpoint_id=directory)
        else:
            _read_metadata(os.path.join(directory, '.metadata'))  # refused here in one line, not inside dcp's logs
            reader, planner = _safe_reader_and_planner(directory)
            dcp.load(state, storage_reader=reader, planner=planner)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f'{directory}: cannot be read ({utils.first_line(e)})') from None
    except CheckpointException as e:  # it wraps each rank's exception, ours included
        unsafe = [c for c in _causes(e) if isinstance(c, UnsafeCheckpointError)]
        if unsafe:
            raise unsafe[0] from None
        raise CheckpointError(f'{directory}: cannot be read ({utils.first_line(list(_causes(e))[-1])})') from None


if __name__ == '__main__':  # for shell recipes: `python checkpoints.py verify MANIFEST`: exit 0 if the entry is intact
    import sys
    if len(sys.argv) != 3 or sys.argv[1] != 'verify':
        sys.exit('usage: python checkpoints.py verify MANIFEST (exit 0: the entry it seals is intact)')
    damage = manifests.manifest_problem(sys.argv[2])
    if damage is not None and os.path.isdir(os.path.dirname(os.path.abspath(sys.argv[2]))):
        print(f'{os.path.dirname(os.path.abspath(sys.argv[2]))} is damaged ({damage})', flush=True)
    sys.exit(0 if damage is None else 1)
