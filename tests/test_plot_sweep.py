"""demo/plot_sweep.py on small synthetic run directories: one PNG with the four panels, one line per run
at the chosen β in panels (b)-(d), the |margin| in (d), and a table row per run."""
import importlib.util
import json
import os

import pytest

import manifests

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location('plot_sweep', os.path.join(ROOT, 'demo', 'plot_sweep.py'))
plot_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_sweep)

LOSSES = {'dpo_beta0.1': 'name: dpo\nbeta: 0.1\ndivergence: reverse_kl',
          'fdpo_fkl_beta0.1': 'name: dpo\nbeta: 0.1\ndivergence: forward_kl',
          'tdpo1_beta0.1': 'name: tdpo\nbeta: 0.1\nalpha: 0.5\nif_tdpo2: false',
          'tdpo2_alpha0.5_beta0.1': 'name: tdpo\nbeta: 0.1\nalpha: 0.5\nif_tdpo2: true',
          'tdpo2_alpha0.5_beta0.5': 'name: tdpo\nbeta: 0.5\nalpha: 0.5\nif_tdpo2: true',
          'sft': 'name: sft'}


def write_run(root, name, loss_yaml, index):
    run = root / name
    (run / 'step-8').mkdir(parents=True)
    (run / 'config.yaml').write_text('loss:\n' + ''.join(f'  {line}\n' for line in loss_yaml.split('\n')))
    with open(run / 'metrics.jsonl', 'w') as f:
        for step in (4, 8, 12, 16):
            f.write(json.dumps({'split': 'train', 'step': step, 'kl_train/chosen': 0.1 * step * (index + 1),
                                'kl_train/rejected': 0.2 * step, 'kl_train/margin': 0.1 * step * (index - 1)}) + '\n')
        f.write(json.dumps({'split': 'eval', 'step': 16, 'kl_eval/chosen': 1.0, 'kl_eval/rejected': 2.0,
                            'kl_eval/margin': -1.0, 'rewards_eval/accuracies': 0.75, 'kl_eval/chosen_stderr': 0.125,
                            'kl_eval/rejected_stderr': 0.25, 'kl_eval/margin_stderr': 0.0625,
                            'rewards_eval/accuracies_stderr': 0.1875, 'counters/eval_examples': 12}) + '\n')
    for directory, seen, kl in ((run / 'step-8', 8, 1.0 + index), (run, 16, 2.0 + 2 * index)):
        (directory / 'eval.json').write_text(json.dumps({
            'examples_seen': seen, 'kl': kl, 'kl_stderr': 0.1, 'policy_reward': 0.3 + 0.01 * kl,
            'policy_reward_stderr': 0.05, 'reference_reward': 0.25}))
        manifests.write_manifest(str(directory / 'eval.json.manifest.json'), [str(directory / 'eval.json')])  # as evaluate.py


def test_plot_sweep_draws_four_panels_from_synthetic_runs(tmp_path, capsys):
    runs_dir = tmp_path / 'runs'
    for index, (name, loss) in enumerate(LOSSES.items()):
        write_run(runs_dir, name, loss, index)
    out = tmp_path / 'fig' / 'sweep.png'
    table_path = tmp_path / 'sweep.md'
    plot_sweep.main([str(runs_dir), '--out', str(out), '--table', str(table_path)])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000

    runs = plot_sweep.find_runs([str(runs_dir)])
    assert sorted(r['method'] for r in runs) == ['DPO', 'TDPO1', 'TDPO2 (α=0.5)', 'TDPO2 (α=0.5)', 'f-DPO (FKL)']
    fig = plot_sweep.plot(runs, str(tmp_path / 'again.png'))
    assert len(fig.axes) == 4
    frontier, chosen, rejected, margin = fig.axes
    # (a): each run a thin line from the reference point (0, 0.25) through its two checkpoints, then one
    # frontier per method: TDPO2's two runs give one frontier through the better points of both
    trajectories, fronts = frontier.lines[:5], frontier.lines[5:]
    assert all(list(line.get_xdata())[0] == 0 and len(line.get_xdata()) == 3 for line in trajectories)
    assert len(fronts) == 4
    tdpo2_front = fronts[-1]
    assert list(tdpo2_front.get_xdata()) == [0, 4.0, 5.0, 8.0, 10.0]  # every point of this synthetic data is on it

    # (b)-(d): the four runs at the smallest β, one line each; (d) is the absolute margin
    for ax in (chosen, rejected, margin):
        assert len(ax.lines) == 4
    assert all(min(line.get_ydata()) >= 0 for line in margin.lines)
    dpo_margin = next(line for line in margin.lines if line.get_label() == 'DPO')
    assert list(dpo_margin.get_ydata()) == pytest.approx([0.4, 0.8, 1.2, 1.6])  # |0.1 * step * (0 - 1)|

    table = table_path.read_text()
    assert table.count('\n| ') == 5 and 'TDPO2 (α=0.5) | 0.5' in table and 'sft' not in table
    # the held-out columns carry their standard errors and n: SeqKL chosen, rejected, |margin|, pair accuracy
    assert table.count(' | 1.00 ± 0.12 | 2.00 ± 0.25 | 1.00 ± 0.06 | 0.75 ± 0.19 | 12 |') == 5, table

    # a truncated eval.json is left out with one line naming it; the others stay
    damaged = runs_dir / 'dpo_beta0.1' / 'step-8' / 'eval.json'
    damaged.write_text(damaged.read_text()[:10])
    runs = plot_sweep.find_runs([str(runs_dir)])
    assert f'plot_sweep: leaving out {damaged}: damaged (eval.json is 10 bytes' in capsys.readouterr().out
    assert [len(r['evals']) for r in runs if r['name'] == 'dpo_beta0.1'] == [1]


def test_plot_sweep_without_runs_says_so(tmp_path):
    with pytest.raises(SystemExit, match='no preference runs'):
        plot_sweep.main([str(tmp_path), '--out', str(tmp_path / 'x.png')])


def test_pareto_front_keeps_only_undominated_points():
    points = [(0, 0.2), (3, 0.5), (2, 0.3), (4, 0.4), (5, 0.6), (5, 0.55), (1, 0.1)]
    assert plot_sweep.pareto_front(points) == [(0, 0.2), (2, 0.3), (3, 0.5), (5, 0.6)]
