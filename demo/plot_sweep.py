"""The TDPO paper's Figure 2 from a sweep's run directories (demo/sweep.sh writes them), in one PNG:
  (a) reward–KL frontier: mean reward of policy samples on held-out prompts against KL(πθ ‖ π_ref) on
      them, one point per evaluated checkpoint (evaluate.py's eval.json), each run a thin line from the
      reference (KL 0) through its checkpoints, each method's frontier (its Pareto-best points over all
      its runs and checkpoints) a thick step line;
  (b), (c) SeqKL(π_ref ‖ πθ) of the preferred / dispreferred responses over training (metrics.jsonl,
      `kl_train/chosen`, `kl_train/rejected`: one value per logged update, a mean over its batch);
  (d) their margin |SeqKL(y_w) − SeqKL(y_l)| over training.
Also writes a Markdown table of the numbers (--table) and prints it.

    python demo/plot_sweep.py .cache/sweep/runs --out sweep.png --table sweep.md
"""
import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import manifests  # noqa: E402

METHOD_COLORS = {'DPO': 'tab:blue', 'f-DPO (FKL)': 'tab:gray', 'TDPO1': 'tab:green'}
TDPO2_COLORS = ['tab:orange', 'tab:red', 'tab:purple', 'tab:brown', 'tab:pink']
BETA_MARKERS = ['o', 's', '^', 'D', 'v']


def method_of(loss) -> Optional[str]:
    """A run's method from its loss config; None for SFT (not a preference run)."""
    if loss.name == 'tdpo':
        return f'TDPO2 (α={loss.alpha:g})' if loss.if_tdpo2 else 'TDPO1'
    if loss.name == 'dpo':
        return 'f-DPO (FKL)' if loss.get('divergence', 'reverse_kl') == 'forward_kl' else 'DPO'
    if loss.name == 'ipo':
        return 'IPO'
    return None


def read_jsonl(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(run_dir: str) -> Optional[Dict]:
    """Config, training metrics and eval.json files of one run directory (None for SFT or no config)."""
    config_path = os.path.join(run_dir, 'config.yaml')
    if not os.path.exists(config_path):
        return None
    config = OmegaConf.load(config_path)
    method = method_of(config.loss)
    if method is None:
        return None
    rows = read_jsonl(os.path.join(run_dir, 'metrics.jsonl'))
    evals = []
    for path in glob.glob(os.path.join(run_dir, 'step-*', 'eval.json')) + glob.glob(os.path.join(run_dir, 'eval.json')):
        problem = manifests.manifest_problem(path + '.manifest.json')  # as evaluate.py seals it
        if problem is not None:
            print(f'plot_sweep: leaving out {path}: damaged ({problem}); demo/sweep.sh evaluates it again', flush=True)
            continue
        with open(path) as f:
            evals.append(json.load(f))
    evals.sort(key=lambda e: e.get('examples_seen') or 0)
    return {'dir': run_dir, 'name': os.path.basename(run_dir.rstrip('/')), 'method': method,
            'beta': float(config.loss.beta), 'train': [r for r in rows if r.get('split') == 'train'],
            'heldout': [r for r in rows if r.get('split') == 'eval'], 'evals': evals}


def find_runs(paths: List[str]) -> List[Dict]:
    """Runs under each path (a run directory, or a directory of run directories), sorted by method and β."""
    dirs = []
    for path in paths:
        dirs += [path] if os.path.exists(os.path.join(path, 'config.yaml')) else sorted(glob.glob(os.path.join(path, '*', '')))
    runs = [r for r in map(load_run, dirs) if r is not None]
    order = ['DPO', 'f-DPO (FKL)', 'TDPO1']
    return sorted(runs, key=lambda r: (order.index(r['method']) if r['method'] in order else len(order), r['method'], r['beta']))


def colors_of(runs: List[Dict]) -> Dict[str, str]:
    colors, tdpo2 = dict(METHOD_COLORS), sorted({r['method'] for r in runs if r['method'] not in METHOD_COLORS})
    colors.update({m: TDPO2_COLORS[i % len(TDPO2_COLORS)] for i, m in enumerate(tdpo2)})
    return colors


def pareto_front(points: List[tuple]) -> List[tuple]:
    """The (KL, reward) points that no other point beats with less or equal KL and more reward, by KL."""
    front, best = [], float('-inf')
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if reward > best:
            front.append((kl, reward))
            best = reward
    return front


def frontier_panel(ax, runs: List[Dict], colors: Dict, markers: Dict, betas: List[float]):
    """Panel (a): each run's (KL, reward) points with their standard errors, each method's frontier, the SFT model."""
    reference_rewards = [e['reference_reward'] for r in runs for e in r['evals'] if 'reference_reward' in e]
    reference_reward = sum(reference_rewards) / len(reference_rewards) if reference_rewards else None
    labelled = set()
    for r in runs:
        if not r['evals']:
            continue
        xs, ys = [e['kl'] for e in r['evals']], [e['policy_reward'] for e in r['evals']]
        if reference_reward is not None:
            xs, ys = [0.0] + xs, [reference_reward] + ys
        label = r['method'] if r['method'] not in labelled else None
        labelled.add(r['method'])
        ax.plot(xs, ys, color=colors[r['method']], alpha=0.25, linewidth=0.8)
        ax.scatter(xs[-len(r['evals']):], ys[-len(r['evals']):], color=colors[r['method']], marker=markers[r['beta']],
                   label=label, zorder=3)
        ax.errorbar(xs[-len(r['evals']):], ys[-len(r['evals']):], color=colors[r['method']], fmt='none', alpha=0.5,
                    xerr=[e.get('kl_stderr') or 0 for e in r['evals']], yerr=[e.get('policy_reward_stderr') or 0 for e in r['evals']])
    for method in dict.fromkeys(r['method'] for r in runs):  # each method's frontier over all its β and checkpoints
        points = [(e['kl'], e['policy_reward']) for r in runs if r['method'] == method for e in r['evals']]
        if reference_reward is not None:
            points.append((0.0, reference_reward))
        front = pareto_front(points)
        if len(front) > 1:
            ax.plot(*zip(*front), color=colors[method], linewidth=2.2, drawstyle='steps-post', zorder=2)
    if reference_reward is not None:
        ax.scatter([0], [reference_reward], color='black', marker='*', s=120, label='reference (SFT)', zorder=4)
    for beta in betas:  # marker legend entries for β
        ax.scatter([], [], color='white', edgecolors='black', marker=markers[beta], label=f'β={beta:g}')
    n_samples = sorted({e['n_samples'] for r in runs for e in r['evals'] if 'n_samples' in e})
    ax.set(xlabel='KL(πθ ‖ π_ref) on policy samples [nats] (± s.e.)', ylabel='mean reward of policy samples (± s.e.)',
           title=f"(a) reward–KL frontier (held-out prompts, n = {'/'.join(map(str, n_samples)) or '?'} samples)")
    ax.legend(fontsize=7, loc='lower right')
    ax.grid(alpha=0.3)


def seqkl_panels(axes, runs: List[Dict], colors: Dict, curves_beta: float):
    """Panels (b)-(d): the training SeqKL of the preferred and dispreferred responses and their margin, per method."""
    panels = [(axes[0, 1], 'kl_train/chosen', '(b) SeqKL of preferred responses', False),
              (axes[1, 0], 'kl_train/rejected', '(c) SeqKL of dispreferred responses', False),
              (axes[1, 1], 'kl_train/margin', '(d) |SeqKL(y_w) − SeqKL(y_l)|', True)]
    for ax, key, title, absolute in panels:
        for r in runs:
            if r['beta'] != curves_beta:
                continue
            points = [(row['step'], row[key]) for row in r['train'] if key in row]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, [abs(v) for v in values] if absolute else values, color=colors[r['method']],
                        label=r['method'], marker='.', linewidth=1.2)
        ax.set(xlabel='training examples', ylabel='SeqKL(π_ref ‖ πθ) [nats]', title=f'{title}, β={curves_beta:g}')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot(runs: List[Dict], out: str, curves_beta: Optional[float] = None):
    """Draw the four panels into `out`; returns the figure. curves_beta: the β whose runs panels (b)–(d)
    show (default: the smallest in the sweep), so that each method has one line there."""
    if not runs:
        raise SystemExit('plot_sweep: no preference runs found')
    colors = colors_of(runs)
    betas = sorted({r['beta'] for r in runs})
    markers = {b: BETA_MARKERS[i % len(BETA_MARKERS)] for i, b in enumerate(betas)}
    curves_beta = betas[0] if curves_beta is None else curves_beta
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    frontier_panel(axes[0, 0], runs, colors, markers, betas)
    seqkl_panels(axes, runs, colors, curves_beta)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    return fig


def _last(rows: List[Dict], key: str) -> Optional[float]:
    values = [row[key] for row in rows if key in row]
    return values[-1] if values else None


def table(runs: List[Dict]) -> str:
    """One Markdown row per run: its final checkpoint's reward and KL, and the SeqKLs of its last
    held-out evaluation."""
    fmt = lambda x, spec='.3f': '' if x is None else format(x, spec)
    held_out = lambda r, key, spec='.2f', f=lambda x: x: '' if _last(r['heldout'], key) is None else (
        f"{fmt(f(_last(r['heldout'], key)), spec)} ± {fmt(_last(r['heldout'], key + '_stderr'), spec)}")
    lines = ['| method | β | final reward (± s.e.) | KL(πθ‖π_ref) (± s.e.) | halfway reward / KL | SeqKL held-out chosen '
             '(± s.e.) | rejected | \\|margin\\| | held-out pair acc. | n held-out |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in runs:
        final = r['evals'][-1] if r['evals'] else {}
        half = r['evals'][0] if len(r['evals']) > 1 else {}
        lines.append(' | '.join([
            f"| {r['method']}", f"{r['beta']:g}",
            f"{fmt(final.get('policy_reward'))} ± {fmt(final.get('policy_reward_stderr'), '.2f')}" if final else '',
            f"{fmt(final.get('kl'), '.2f')} ± {fmt(final.get('kl_stderr'), '.2f')}" if final else '',
            f"{fmt(half.get('policy_reward'))} / {fmt(half.get('kl'), '.2f')}" if half else '',
            held_out(r, 'kl_eval/chosen'), held_out(r, 'kl_eval/rejected'), held_out(r, 'kl_eval/margin', f=abs),
            held_out(r, 'rewards_eval/accuracies'), fmt(_last(r['heldout'], 'counters/eval_examples'), 'd')])
            + ' |')
    references = [e['reference_reward'] for r in runs for e in r['evals'] if 'reference_reward' in e]
    if references:
        lines.append(f'\nReference (SFT) mean reward on the same prompts: {references[0]:.3f}.')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', help='run directories, or directories holding them (e.g. .cache/sweep/runs)')
    parser.add_argument('--out', default='sweep.png', help='the PNG to write')
    parser.add_argument('--table', default=None, help='also write the Markdown table here')
    parser.add_argument('--curves-beta', type=float, default=None, help='β of the runs in panels (b)-(d); default: the smallest')
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    plot(runs, args.out, args.curves_beta)
    text = table(runs)
    print(text)
    if args.table:
        with open(args.table, 'w') as f:
            f.write(text)
    print(f'wrote {args.out}' + (f' and {args.table}' if args.table else ''))


if __name__ == '__main__':
    main()
