"""demo/: scores the HH recipe's models on held-out preference pairs (`make hh`, demo/hh.sh, step 4).

For every held-out pair, and every trained policy and the SFT model it started from (the reference):
the summed log-probabilities of the chosen and the rejected response, and the sequential KL
(Zeng et al. 2024, Eq. 14: Σ_t KL(π_ref(·|x,y<t) ‖ πθ(·|x,y<t))) of the policy from the SFT model on each.
The pairs are the ones train.py holds out for the same overrides, tokenized and truncated exactly as training
reads them, laid out as training lays them out (packed rows); the reference runs once per batch for all the
policies. Per model, also the diversity measure:
the mean per-token entropy of the model's own samples on the first --n-gen held-out prompts.

  python demo/hh_score.py --runs DIR --out DIR --models sft,dpo,tdpo2 [--n-gen 64 --max-new-tokens 64]
      [--validation-of 0.25] -- <train.py overrides naming the data, lengths and model>

writes <out>/pairs/<name>.jsonl (one record per pair, in the eval data's order) and <out>/samples/<name>.jsonl,
each completed by a manifest written last (<file>.manifest.json, by manifests.write_manifest: size and hash,
and the model's weights and settings it came from): a file whose manifest is missing or does not match is
scored again, saying which.
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import batches  # noqa: E402
import evaluate  # noqa: E402
import manifests  # noqa: E402
import pair_layout  # noqa: E402
import preference_datasets  # noqa: E402
import run_config  # noqa: E402
import token_stats  # noqa: E402
import utils  # noqa: E402

REFERENCE = 'sft'


# --------------------------------------------------------------------------------------------------
# Files that a rerun may skip: verified against a manifest written last
# --------------------------------------------------------------------------------------------------

def model_fingerprint(model_dir: str) -> Dict[str, List[int]]:
    """{weights file: [bytes, mtime in ns]} of a Hugging Face export: which weights a score came from."""
    return {name: [os.path.getsize(os.path.join(model_dir, name)), os.stat(os.path.join(model_dir, name)).st_mtime_ns]
            for name in sorted(os.listdir(model_dir)) if name.endswith(('.safetensors', '.bin'))}


def write_verified(path: str, lines: List[Dict], source: Dict):
    """`lines` as JSON lines at `path` (atomically), then its manifest (manifests.write_manifest, written last)
    with the `source` it was computed from."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
    os.replace(path + '.tmp', path)
    manifests.write_manifest(path + '.manifest.json', [path], extra={'records': len(lines), 'source': source})


def verified_problem(path: str, source: Dict) -> Optional[str]:
    """None if `path` is complete and came from `source` (its manifest verifies and names it), else why not."""
    if not os.path.exists(path):
        return 'missing'
    problem = manifests.manifest_problem(path + '.manifest.json')
    if problem:
        return f'is damaged ({problem})'
    with open(path + '.manifest.json') as f:
        if json.load(f).get('source') != source:
            return 'was computed from other weights or settings'
    return None


def read_jsonl(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------

def length_sorted_batches(examples: List, batch_size: int) -> List[List[int]]:
    """Indices of `examples` in batches of similar length (little padding), longest first."""
    longest = lambda i: len(examples[i].prompt_ids) + max(len(examples[i].chosen_ids), len(examples[i].rejected_ids))
    order = sorted(range(len(examples)), key=longest, reverse=True)
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def choose_layout(models: List[torch.nn.Module], vocab_size: int) -> str:
    """'packed' (train.py's default: each prompt once, rows of about max_length tokens, no padding) if every
    model takes its masks, else 'padded' (the reference implementation's), saying why."""
    for model in models:
        reason = pair_layout.prepare_model(model) or pair_layout.check_model(model, vocab_size)
        if reason:
            print(f'hh_score: {reason}; using the padded layout', flush=True)
            return 'padded'
    return 'packed'


@torch.no_grad()
def pair_scores(models: Dict[str, torch.nn.Module], reference: torch.nn.Module, examples: List, pad_id: int,
                batch_size: int, layout_name: str, row_tokens: int) -> Dict[str, List[Dict]]:
    """Per model name, one record per example (in order): token ids as read, summed log-probs of chosen and
    rejected under the model and the reference, and the SeqKL of the model from the reference on each.
    The pairs are laid out as training lays them out (pair_layout: all layouts give the same statistics),
    and the reference runs once per batch for all models."""
    device = next(reference.parameters()).device
    records = {name: [None] * len(examples) for name in models}
    start, done = time.time(), 0
    for indices in length_sorted_batches(examples, batch_size):
        batch = utils.move_batch(batches.collate([examples[i] for i in indices], pad_id), device)
        layout = pair_layout.arrange(batch, layout_name, row_tokens)
        rows, targets, seq = pair_layout.response_rows(layout)
        stats = lambda logits, reference_logits: [s.tolist() for s in token_stats.chunked_row_stats(
            logits, reference_logits, rows, targets, seq, layout.n_sequences)]
        reference_logits = reference(**pair_layout.model_inputs(layout, reference)).logits.flatten(0, 1)
        reference_logps = stats(reference_logits, reference_logits)[2]
        n = len(indices)
        for name, model in models.items():
            logits = (reference_logits if model is reference
                      else model(**pair_layout.model_inputs(layout, model)).logits.flatten(0, 1))
            _, seq_kl, logps = stats(logits, reference_logits)
            for j, i in enumerate(indices):
                e = examples[i]
                records[name][i] = {
                    'prompt_ids': e.prompt_ids, 'chosen_ids': e.chosen_ids, 'rejected_ids': e.rejected_ids,
                    'chosen_logp': logps[j], 'rejected_logp': logps[n + j],
                    'ref_chosen_logp': reference_logps[j], 'ref_rejected_logp': reference_logps[n + j],
                    'seqkl_chosen': seq_kl[j], 'seqkl_rejected': seq_kl[n + j],
                    'correct': logps[j] - reference_logps[j] > logps[n + j] - reference_logps[n + j]}
        done += n
        print(f'  scored {done}/{len(examples)} pairs with {", ".join(models)} ({time.time() - start:.0f} s)', flush=True)
    return records


@torch.no_grad()
def token_entropies(model, prompt_ids: List[List[int]], response_ids: List[List[int]], pad_id: int) -> List[float]:
    """Per response: the mean over its tokens t of H(π(·|x, y<t)) = −Σ_v π(v|x,y<t) log π(v|x,y<t), in nats
    (0 for an empty response)."""
    device = next(model.parameters()).device
    out = []
    for p, r in zip(prompt_ids, response_ids):
        if not r:
            out.append(0.0)
            continue
        ids = torch.tensor([p + r], device=device)
        logps = model(input_ids=ids).logits[0, len(p) - 1:-1].float().log_softmax(-1)  # positions predicting r
        out.append(-(logps.exp() * logps).sum(-1).mean().item())
    return out


def sample_records(model, tokenizer, prompts: List[List[int]], max_new_tokens: int, seed: int, name: str) -> List[Dict]:
    """One ancestral sample (temperature 1, no top-k/top-p) per prompt, with its mean token entropy."""
    responses = evaluate.sample(model, tokenizer, prompts, max_new_tokens, seed, batch_size=16, desc=f'{name} samples')
    entropies = token_entropies(model, prompts, responses, tokenizer.pad_token_id)
    return [{'prompt_ids': p, 'response_ids': r, 'text': tokenizer.decode(r, skip_special_tokens=True),
             'entropy': h, 'tokens': len(r)} for p, r, h in zip(prompts, responses, entropies)]


# --------------------------------------------------------------------------------------------------
# The held-out pairs, as training reads them
# --------------------------------------------------------------------------------------------------

def held_out_examples(overrides: List[str], tokenizer, validation_of: Optional[float]) -> List:
    """The pairs train.py evaluates on for `overrides` (its test split); with validation_of=f, those whose
    prompt is not among the eval_fraction=f held-out prompts (the tuning slice of the training part)."""
    config = run_config.compose_config(['exp_name=hh_score', 'loss=tdpo', 'wandb.enabled=false', *overrides])
    examples = preference_datasets.load_split(config, tokenizer, 'test', utils.get_local_dir(config.local_dirs))
    if validation_of:
        examples = [e for e in examples if not preference_datasets.is_eval_prompt(e.prompt, validation_of)]
    return examples


def max_length(overrides: List[str]) -> int:
    """max_length of the runs (the packed layout's row length), as train.py composes it."""
    return run_config.compose_config(['exp_name=hh_score', *overrides]).max_length


def distinct_prompts(examples: List, n: int) -> List[List[int]]:
    seen, prompts = set(), []
    for e in examples:
        if len(prompts) < n and tuple(e.prompt_ids) not in seen:
            seen.add(tuple(e.prompt_ids))
            prompts.append(e.prompt_ids)
    return prompts


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', required=True, help='directory of the runs: <runs>/<name>/hf')
    parser.add_argument('--out', required=True, help='writes <out>/pairs/ and <out>/samples/')
    parser.add_argument('--models', required=True, help='comma-separated run names; sft is the reference')
    parser.add_argument('--n-gen', type=int, default=64, help='held-out prompts sampled per model (0: none)')
    parser.add_argument('--max-new-tokens', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=8, help='pairs per forward pass')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--dtype', default='float32', help='of the models (float32, bfloat16)')
    parser.add_argument('--validation-of', type=float, default=None,
                        help='score the validation slice: held-out pairs outside this eval_fraction')
    parser.add_argument('overrides', nargs='*', help='train.py overrides (after --)')
    args = parser.parse_args(argv)
    names = [REFERENCE] + [m for m in args.models.split(',') if m and m != REFERENCE]
    model_dirs = {name: os.path.join(args.runs, name, 'hf') for name in names}
    for name, path in model_dirs.items():
        if not os.path.exists(os.path.join(path, 'config.json')):
            raise SystemExit(f'hh_score: {path} is not an exported model: train {name} first')
    settings = {'overrides': args.overrides, 'validation_of': args.validation_of, 'dtype': args.dtype}
    pair_source = {name: {'model': model_fingerprint(model_dirs[name]), 'reference': model_fingerprint(model_dirs[REFERENCE]),
                          **settings} for name in names}
    sample_source = {name: {'model': model_fingerprint(model_dirs[name]), 'n_gen': args.n_gen, 'seed': args.seed,
                            'max_new_tokens': args.max_new_tokens, **settings} for name in names}
    pairs_path = lambda name: os.path.join(args.out, 'pairs', f'{name}.jsonl')
    samples_path = lambda name: os.path.join(args.out, 'samples', f'{name}.jsonl')
    todo_pairs, todo_samples = [], []
    for name in names:
        for todo, path, source in ((todo_pairs, pairs_path(name), pair_source[name]),
                                   (todo_samples, samples_path(name), sample_source[name])):
            problem = verified_problem(path, source)
            if problem:
                if problem != 'missing':
                    print(f'hh_score: {path} {problem}; scoring {name} again', flush=True)
                todo.append(name)
    if not todo_pairs and not (todo_samples and args.n_gen):
        print(f'hh_score: every score in {args.out} is complete', flush=True)
        return
    loaded = {name: evaluate.load(model_dirs[name], args.dtype)[:2] for name in sorted(set(todo_pairs + todo_samples) | {REFERENCE})}
    tokenizer = loaded[REFERENCE][1]
    examples = held_out_examples(args.overrides, tokenizer, args.validation_of)
    print(f'hh_score: {len(examples)} held-out pairs; scoring pairs of {todo_pairs or "none"}, samples of '
          f'{todo_samples if args.n_gen else "none"}', flush=True)
    if todo_pairs:
        models = {name: loaded[name][0] for name in todo_pairs}
        layout = choose_layout([loaded[REFERENCE][0], *models.values()], len(tokenizer))
        records = pair_scores(models, loaded[REFERENCE][0], examples, tokenizer.pad_token_id, args.batch_size,
                              layout, max_length(args.overrides))
        for name in todo_pairs:
            write_verified(pairs_path(name), records[name], pair_source[name])
    if args.n_gen:
        prompts = distinct_prompts(examples, args.n_gen)
        for name in todo_samples:
            records = sample_records(loaded[name][0], tokenizer, prompts, args.max_new_tokens, args.seed, name)
            write_verified(samples_path(name), records, sample_source[name])


if __name__ == '__main__':
    main()
