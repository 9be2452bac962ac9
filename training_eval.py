"""The evaluation pass of a training run: the eval examples' metrics (each rank its slice, gathered), their means
with standard errors in metrics.jsonl, and samples of the policy's and the reference's continuations of the first
prompts in samples.jsonl.

It exists apart from trainers.py so that BasicTrainer holds the run's loop and its hooks, and this job, which only
reads the trainer, is written once for every trainer: `evaluate` calls the trainer's hooks (`get_batch_metrics`,
`get_batch_samples`, `reference_forward`, `generate`), so that the sharded trainers' overrides apply here too. Never
imports trainers.py (the trainer is passed in), nor evaluate.py (an entry point: evaluation after training).
"""
import math
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
from tqdm import tqdm

import batches
import distributed
import run_logging
import utils


def evaluate(trainer) -> Dict[str, float]:
    """BasicTrainer.evaluate: the eval metrics' means (logged, rank 0), and samples if sample_during_eval."""
    utils.rank0_print(f'running evaluation after {trainer.example_counter} train examples')
    trainer.policy.eval()
    all_metrics = defaultdict(list)
    eval_batches = batches.batch_iterator(trainer.eval_examples, trainer.config.eval_batch_size,
                                          trainer.tokenizer.pad_token_id, shuffle=False, n_epochs=1, drop_last=False)
    samples, n_sample_batches = [], math.ceil(trainer.config.n_eval_model_samples / trainer.config.eval_batch_size)
    for i, batch in enumerate(tqdm(eval_batches, desc='Computing eval metrics', disable=trainer.rank != 0, leave=False)):
        local = utils.move_batch(utils.slice_batch(batch, trainer.data_rank, trainer.data_world_size), trainer.device)
        with torch.no_grad():
            _, metrics = trainer.get_batch_metrics(local, train=False)
        for k, v in metrics.items():
            all_metrics[k].extend(v)
        if trainer.config.sample_during_eval and i < n_sample_batches:
            rows = run_logging.sample_rows(trainer.example_counter, local['prompt'], *trainer.get_batch_samples(local))
            samples += distributed.all_gather_objects(rows, trainer.data_world_size)  # the whole batch, in order
    mean_metrics = run_logging.eval_metrics(all_metrics)  # means, their standard errors, n
    trainer.last_eval = trainer.example_counter
    utils.rank0_print(f'eval after {trainer.example_counter}: {utils.formatted_dict(mean_metrics)}')
    trainer.log(mean_metrics, 'eval')
    if samples and trainer.rank == 0:
        run_logging.log_samples(samples[:trainer.config.n_eval_model_samples], trainer.example_counter,
                                trainer.run_dir, with_reference=not trainer.is_sft)
    return mean_metrics


def generate(model, batch: Dict, max_length: int, pad_token_id: int, **generate_kwargs) -> torch.Tensor:
    """BasicTrainer.generate: sampled continuations (B, new tokens) of the left-padded prompts, up to max_length."""
    prompt = batch['prompt_input_ids']
    output = model.generate(input_ids=prompt, attention_mask=batch['prompt_attention_mask'], do_sample=True,
                            max_new_tokens=max(1, max_length - prompt.shape[1]),
                            pad_token_id=pad_token_id, **generate_kwargs)
    return output[:, prompt.shape[1]:]


def batch_samples(trainer, batch: Dict) -> Tuple[List[str], List[str]]:
    """BasicTrainer.get_batch_samples: completions from the policy and (for preference losses) the reference,
    each sampled with the trainer's `generate`."""
    decode = lambda ids: trainer.tokenizer.batch_decode(ids, skip_special_tokens=True)
    policy_samples = decode(trainer.generate(trainer.policy, batch))
    if trainer.is_sft:
        return policy_samples, []
    with trainer.reference_forward() as reference:
        return policy_samples, decode(trainer.generate(reference, batch))
