"""demo/: the offline controlled-sentiment demo/experiment behind `make demo`, in the spirit of the TDPO
paper's IMDb experiment (Zeng et al., ICML 2024, Sec. 5): make a small pretrained model (SmolLM2-135M-
Instruct, `model=smollm2-135m`) write more positive movie reviews, with a sentiment classifier (VADER,
offline) as the reward, and measure the reward gained against the KL paid.

Subcommands (run from the repo root; `bash demo/run_demo.sh` runs them all around train.py):
  build     prompts asking for short movie reviews -> two sampled reviews each -> VADER-labelled
            preference pairs in the project's explicit local format (one JSON object per line with
            `prompt` (chat messages), `chosen`, `rejected`), plus a held-out test file of disjoint prompts.
  report    the before/after table of a demo run (its evaluation is `evaluate.py`) and its summary JSON.
Sampling and the VADER reward are evaluate.py's, so that pairs are built and scored the same way.
"""
import argparse
import itertools
import json
import os
import random
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import manifests  # noqa: E402
from evaluate import load, sample, vader_reward as reward  # noqa: E402
import preference_datasets  # noqa: E402

SYSTEM = 'You are a film critic.'
TITLES = ['Starfall Harbor', 'The Glass Orchard', 'Midnight at Pell Station', 'Copper Fields', 'The Last Lighthouse',
          'Echoes of Varn', 'Paper Kingdoms', 'The Silent Tide', 'Neon Pilgrims', 'A House Called Winter',
          'The Clockmaker\'s Daughter', 'Red Desert Run', 'Blue Hour', 'The Ninth Door', 'Salt and Thunder',
          'Ghosts of Kettle Hill', 'Iron Lullaby', 'The Quiet Engine', 'Summer of the Fox', 'Hollow Crown Road',
          'The Marigold Heist', 'Under Ash Skies', 'Small Gods of Brook Lane', 'The Velvet Signal',
          'Northbound', 'Seven Lanterns', 'The Orbit Diaries', 'Wolves of Carrow', 'A Map of Rain',
          'The Borrowed Year', 'Falling Upward', 'Citadel of Moths', 'The Long Weekend', 'Static Hearts',
          'River of Kings', 'The Tin Astronaut', 'Lost in Amberly', 'Night Train to Oslo', 'The Honest Thief',
          'Bright Young Monsters', 'The Cartographer', 'Dust and Diamonds', 'Harvest Moon Motel',
          'The Ember Protocol', 'Letters from Juniper', 'Signal Lost', 'The Winter Carnival', 'Goldfinch Avenue']
GENRES = ['sci-fi drama', 'romantic comedy', 'horror film', 'crime thriller', 'family animation', 'war epic',
          'musical', 'western', 'fantasy adventure', 'documentary', 'heist comedy', 'psychological thriller']
PHRASINGS = ['Write a short review of the movie "{title}", a {genre}.',
             'Review the {genre} "{title}" in two or three sentences.',
             'What did you think of "{title}"? It is a {genre}. Give a brief review.',
             'Give your short critic\'s take on "{title}", a new {genre}.',
             'In a few sentences, review "{title}" ({genre}).',
             'Write a brief movie review of "{title}", a {genre} that just came out.']


# --------------------------------------------------------------------------------------------------
# Models, prompts, rewards
# --------------------------------------------------------------------------------------------------

def set_threads():
    """DEMO_THREADS=N pins torch's CPU threads (1 is much faster than 2 when other jobs share 2 cores)."""
    if os.environ.get('DEMO_THREADS'):
        torch.set_num_threads(int(os.environ['DEMO_THREADS']))


def candidate_prompts(seed: int) -> List[List[Dict[str, str]]]:
    """Every title x genre x phrasing as chat messages, in a seeded order."""
    combos = list(itertools.product(TITLES, GENRES, PHRASINGS))
    random.Random(seed).shuffle(combos)
    return [[{'role': 'system', 'content': SYSTEM},
             {'role': 'user', 'content': phrasing.format(title=title, genre=genre)}] for title, genre, phrasing in combos]


def render(tokenizer, messages) -> str:
    """The prompt string exactly as preference_datasets renders a chat-message `prompt`."""
    if isinstance(messages, str):
        return messages
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def is_eval_prompt(prompt: str, eval_fraction: float) -> bool:
    """preference_datasets' held-out rule for local files (stable md5 bucket of the rendered prompt).
    The demo's train prompts are all outside this slice and its test prompts all inside, so train.py keeps
    every train pair for training and every test pair for evaluation."""
    return preference_datasets.is_eval_prompt(prompt, eval_fraction)


# --------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------

def test_path(out: str) -> str:
    base = out[:-len('.jsonl')] if out.endswith('.jsonl') else out
    return base + '_test.jsonl'


def preference_rows(msgs_list: List, texts: List[str], min_gap: float):
    """The pairs of two samples per prompt (`texts[2i]`, `texts[2i + 1]` for prompt i): the more positive one
    chosen; a pair closer than `min_gap` in reward, or with an empty sample, dropped. Returns the rows, the number
    dropped and every sample's reward."""
    rows, n_ties, scores = [], 0, []
    for i, msgs in enumerate(msgs_list):
        a, b = texts[2 * i], texts[2 * i + 1]
        ra, rb = reward(a), reward(b)
        scores += [ra, rb]
        if abs(ra - rb) < min_gap or not a or not b:
            n_ties += 1
            continue
        (chosen, rc), (rejected, rr) = sorted([(a, ra), (b, rb)], key=lambda x: -x[1])
        rows.append({'prompt': msgs, 'chosen': chosen, 'rejected': rejected,
                     'chosen_reward': rc, 'rejected_reward': rr})
    return rows, n_ties, scores


def build(args):
    set_threads()
    test_out = args.test_out or test_path(args.out)
    meta_path = args.out + '.meta.json'
    meta = {k: v for k, v in vars(args).items() if k not in ('func', 'command')}
    meta['test_out'] = test_out
    meta['format_version'] = 1
    manifest = args.out + '.manifest.json'  # sealed last: the three files are complete and intact
    if any(os.path.exists(p) for p in (args.out, test_out, meta_path)):
        problem = manifests.manifest_problem(manifest)
        if problem is None:
            with open(meta_path) as f:
                old = json.load(f)
            if old.get('args') == meta:
                print(f'build: {args.out} and {test_out} exist, built with the same arguments; skipping '
                      f'({old["n_train_pairs"]} train / {old["n_test_pairs"]} test pairs)')
                return
        else:
            print(f'build: the cached pairs {args.out} are damaged ({problem}); building them again', flush=True)
    start = time.time()
    model, tokenizer, _, _ = load(f'model:{args.model}')
    # Train prompts outside train.py's held-out slice of a local file, test prompts inside it (see is_eval_prompt).
    train_msgs, test_msgs = [], []
    for msgs in candidate_prompts(args.seed):
        target = test_msgs if is_eval_prompt(render(tokenizer, msgs), args.eval_fraction) else train_msgs
        if len(target) < (args.n_test_prompts if target is test_msgs else args.n_prompts):
            target.append(msgs)
        if len(train_msgs) == args.n_prompts and len(test_msgs) == args.n_test_prompts:
            break
    if len(train_msgs) < args.n_prompts or len(test_msgs) < args.n_test_prompts:
        raise SystemExit(f'only {len(train_msgs)} train / {len(test_msgs)} test prompts available')
    stats = {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for split, msgs_list, path in (('train', train_msgs, args.out), ('test', test_msgs, test_out)):
        prompts = [render(tokenizer, m) for m in msgs_list]
        # two samples per prompt: both copies of a prompt sit in one batch, a different draw each
        doubled = [p for p in prompts for _ in range(2)]
        doubled_ids = tokenizer(doubled, add_special_tokens=False)['input_ids']  # as inference tokenizes them
        responses = sample(model, tokenizer, doubled_ids, args.max_new_tokens, args.seed + (split == 'test'),
                              args.batch_size, args.temperature, desc=f'{split} samples')
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        rows, n_ties, scores = preference_rows(msgs_list, texts, args.min_gap)
        with open(path + '.tmp', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
        os.replace(path + '.tmp', path)
        stats[split] = dict(prompts=len(msgs_list), pairs=len(rows), skipped_near_ties=n_ties,
                            mean_sample_reward=sum(scores) / len(scores),
                            mean_chosen_reward=sum(r['chosen_reward'] for r in rows) / max(1, len(rows)),
                            mean_rejected_reward=sum(r['rejected_reward'] for r in rows) / max(1, len(rows)))
        print(f'build: {path}: {stats[split]}', flush=True)
    seconds = time.time() - start
    with open(meta_path, 'w') as f:
        json.dump({'args': meta, 'n_train_pairs': stats['train']['pairs'], 'n_test_pairs': stats['test']['pairs'],
                   'stats': stats, 'build_seconds': seconds}, f, indent=1)
    manifests.write_manifest(manifest, [args.out, test_out, meta_path])
    print(f'build: done in {seconds:.0f} s')


def last_eval(run_dir: str) -> Dict:
    """The last `eval` line of a run's metrics.jsonl ({} if none)."""
    path = os.path.join(run_dir, 'metrics.jsonl')
    rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    evals = [r for r in rows if r.get('split') == 'eval']
    return evals[-1] if evals else {}


def report(args):
    with open(args.eval) as f:
        ev = json.load(f)
    timings = json.loads(args.timings) if args.timings else {}
    meta = json.load(open(args.data + '.meta.json')) if args.data and os.path.exists(args.data + '.meta.json') else {}
    tdpo_eval = last_eval(args.tdpo_run)
    sft_eval = last_eval(args.sft_run) if args.sft_run else {}
    f3 = lambda x: '   n/a' if x is None else f'{x:+.3f}'
    rows = [
        ('mean VADER reward of samples (held-out prompts)', ev['reference_reward'], ev['policy_reward']),
        ('share of positive samples (compound > 0.05)', ev['reference_positive_share'], ev['policy_positive_share']),
        ('KL(policy || reference), MC on policy samples [nats]', 0.0, ev['kl']),
        ('SeqKL(policy || reference) on policy samples [nats]', 0.0, ev['seq_kl']),
        ('mean response length [tokens]', ev['reference_response_tokens'], ev['policy_response_tokens']),
    ]
    n = f"{ev['n_samples']} samples of {ev['n_prompts']} held-out prompts"
    print('=' * 86)
    print(f'Controlled sentiment, SmolLM2-135M-Instruct: reference = SFT model, policy = TDPO2 ({n})')
    print('-' * 86)
    print(f'{"":56s}{"before (SFT)":>14s}{"after (TDPO2)":>16s}')
    for name, before, after in rows:
        print(f'{name:56s}{f3(before):>14s}{f3(after):>16s}')
    acc = tdpo_eval.get('rewards_eval/accuracies')
    print('-' * 86)
    if tdpo_eval:
        print(f'held-out preference pairs ({tdpo_eval.get("step")} train examples seen): '
              f'TDPO2 implicit-reward accuracy {acc:.3f}, loss {tdpo_eval.get("loss/eval"):.4f}, '
              f'SeqKL(ref||policy) chosen {tdpo_eval.get("kl_eval/chosen"):.4f} / rejected {tdpo_eval.get("kl_eval/rejected"):.4f}')
    if timings:
        print('stage timings [s]: ' + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()))
    print('=' * 86)
    summary = {'eval': {k: v for k, v in ev.items() if k != 'examples'}, 'examples': ev.get('examples', [])[:4],
               'tdpo_heldout_eval': tdpo_eval, 'sft_heldout_eval': sft_eval, 'data': meta,
               'sft_run': args.sft_run, 'tdpo_run': args.tdpo_run, 'timings_s': timings,
               'reward_gain': ev['policy_reward'] - ev['reference_reward']}
    with open(args.out, 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'summary written to {args.out}')
    for e in ev.get('examples', [])[:3]:
        print(f'\nprompt: {e["prompt"]}\n  SFT   ({e["reference_reward"]:+.2f}): {e["reference"]!r}'
              f'\n  TDPO2 ({e["policy_reward"]:+.2f}): {e["policy"]!r}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    b = sub.add_parser('build', help='sample and VADER-label preference pairs (cached)')
    b.add_argument('--out', default='.cache/demo/sentiment_pairs.jsonl')
    b.add_argument('--test-out', default=None, help='held-out pairs (default: <out>_test.jsonl)')
    b.add_argument('--n-prompts', type=int, default=128, help='train prompts (each gives at most one pair)')
    b.add_argument('--n-test-prompts', type=int, default=32, help='held-out prompts, disjoint from the train ones')
    b.add_argument('--max-new-tokens', type=int, default=48)
    b.add_argument('--temperature', type=float, default=1.0)
    b.add_argument('--min-gap', type=float, default=0.2, help='skip pairs whose rewards differ by less')
    b.add_argument('--batch-size', type=int, default=64)
    b.add_argument('--seed', type=int, default=0)
    b.add_argument('--model', default='smollm2-135m', help='config/model/<name>.yaml')
    b.add_argument('--eval-fraction', type=float, default=0.05, help='must equal train.py eval_fraction')
    b.set_defaults(func=build)
    r = sub.add_parser('report', help='print the before/after table, write the summary JSON')
    r.add_argument('--eval', required=True)
    r.add_argument('--tdpo-run', required=True)
    r.add_argument('--sft-run', default=None)
    r.add_argument('--data', default=None, help='the train pairs file (for its .meta.json)')
    r.add_argument('--timings', default=None, help='JSON object of stage -> seconds')
    r.add_argument('--out', default='.cache/demo/summary.json')
    r.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    main()
