"""Run logging: the only importer of wandb.

What belongs here: starting wandb for a run (`init_wandb`; online or offline: `wandb_mode`) and the wandb run id
its checkpoints record (`wandb_run_id`); the lines of metrics.jsonl with their wandb steps (`log`; what a line holds:
`train_metrics`, `eval_metrics`) and the progress bar's numbers (`progress_postfix`); the evaluation samples in samples.jsonl
and wandb tables (`sample_rows`, `log_samples`); cutting metrics.jsonl back to a resumed checkpoint's step
(`truncate_metrics`). The trainer decides when to log and what; this module decides
how it is written. wandb is imported inside the functions, so that importing the trainers does not load it;
it runs only on rank 0 (train.py starts it there).
"""
import contextlib
import json
import math
import os
import socket
from typing import Dict, List, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf


def init_wandb(config: DictConfig, run_id: Optional[str] = None):
    """wandb as the reference uses it; offline when there are no credentials or no network; a resumed
    run continues its wandb run."""
    import wandb
    mode = 'disabled' if config.debug or not config.wandb.enabled else wandb_mode()
    if mode == 'offline':
        print('wandb: no credentials or no network; logging offline to a local run '
              '(upload later with `wandb sync`)', flush=True)
    if mode != 'disabled':
        wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name, mode=mode,
                   config=OmegaConf.to_container(config), dir=config.local_run_dir, id=run_id,
                   resume='allow' if run_id else None)


def wandb_mode() -> str:
    """'online' with credentials and a reachable server, else 'offline' (a local run for `wandb sync`).
    An explicit WANDB_MODE wins."""
    if os.environ.get('WANDB_MODE'):
        return os.environ['WANDB_MODE']
    has_key = bool(os.environ.get('WANDB_API_KEY'))
    if not has_key:
        with contextlib.suppress(Exception):
            import netrc
            has_key = netrc.netrc().authenticators('api.wandb.ai') is not None
    if not has_key:
        return 'offline'
    host = os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai').split('://')[-1].split('/')[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return 'online'
    except OSError:
        return 'offline'


def finish_wandb():
    """End this process's wandb run, if it started one (rank 0 of a run with wandb.enabled)."""
    import wandb
    if wandb.run is not None:
        wandb.finish()


def wandb_run_id() -> Optional[str]:
    """The id of this process's wandb run (training_state.pt keeps it, so that a resumed run continues it), or None."""
    import wandb
    return wandb.run.id if wandb.run is not None else None


def log(metrics: Dict, split: str, step: int, metrics_path: str):
    """One JSON line in metrics.jsonl and one wandb step, keyed by `step` (examples seen). Rank 0 calls it."""
    import wandb
    if wandb.run is not None:
        wandb.log(metrics, step=step)
    with open(metrics_path, 'a') as f:
        f.write(json.dumps({'split': split, 'step': step, **metrics}) + '\n')


def train_metrics(pending: Dict[str, List[float]], examples: int, updates: int, nonfinite_updates: int) -> Dict:
    """What a train line holds: the means of the training metrics pending since the last log, then the counters."""
    mean_metrics = {k: sum(v) / len(v) for k, v in pending.items()}
    mean_metrics['counters/examples'] = examples
    mean_metrics['counters/updates'] = updates
    mean_metrics['counters/nonfinite_updates'] = nonfinite_updates
    return mean_metrics


def eval_metrics(values: Dict[str, List[float]]) -> Dict:
    """What an eval line holds: each metric's mean over the eval examples (`values`: per-example values), then
    each mean's standard error (sample sd / sqrt(n)) and n, so that held-out numbers are read against their noise."""
    mean_metrics = {k: sum(v) / len(v) for k, v in values.items()}
    mean_metrics.update({f'{k}_stderr': float(np.std(v, ddof=1)) / math.sqrt(len(v))
                         for k, v in values.items() if len(v) > 1})
    mean_metrics['counters/eval_examples'] = len(next(iter(values.values()), []))
    return mean_metrics


def progress_postfix(pending: Dict[str, List[float]], is_sft: bool) -> Dict[str, str]:
    """What the progress bar shows: the mean loss (and for preference losses the reward accuracy) of the
    training metrics pending since the last log."""
    postfix = {'loss': np.mean(pending['loss/train'])}
    if not is_sft:
        postfix['acc'] = np.mean(pending['rewards_train/accuracies'])
    return {k: f'{v:.4g}' for k, v in postfix.items()}


def sample_rows(step: int, prompts: List[str], policy_samples: List[str], reference_samples: List[str]
                ) -> List[Dict]:
    """samples.jsonl's rows for one batch of evaluation samples; 'reference' is None without reference
    samples (SFT)."""
    return [{'step': step, 'prompt': prompt, 'policy': policy_samples[j],
             'reference': reference_samples[j] if reference_samples else None}
            for j, prompt in enumerate(prompts)]


def log_samples(samples: List[Dict], step: int, run_dir: str, with_reference: bool):
    """Evaluation samples ({'step', 'prompt', 'policy', 'reference'} each) appended to <run_dir>/samples.jsonl,
    and as wandb tables at `step`: the policy's, and with_reference (preference losses) the reference's."""
    import wandb
    with open(os.path.join(run_dir, 'samples.jsonl'), 'a') as f:
        f.writelines(json.dumps(s) + '\n' for s in samples)
    if wandb.run is not None:
        columns = ['step', 'prompt', 'sample']
        wandb.log({'policy_samples': wandb.Table(columns=columns, data=[[s['step'], s['prompt'], s['policy']] for s in samples])},
                  step=step)
        if with_reference:
            wandb.log({'reference_samples': wandb.Table(columns=columns, data=[[s['step'], s['prompt'], s['reference']] for s in samples])},
                      step=step)


def truncate_metrics(path: str, step: int):
    """Keep the metrics.jsonl lines logged up to `step` (a resumed run logs the rest again) and drop a
    torn line (a kill or a full disk in the middle of a write)."""
    if not os.path.exists(path):
        return
    kept, torn = [], 0
    with open(path, 'rb') as f:
        for line in f:
            try:
                line_step = json.loads(line)['step']
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if line_step <= step:
                kept.append(line.rstrip(b'\n') + b'\n')
    if torn:
        print(f'resume: dropped {torn} torn line(s) of {path}', flush=True)
    with open(path + '.tmp', 'wb') as f:
        f.writelines(kept)
    os.replace(path + '.tmp', path)
