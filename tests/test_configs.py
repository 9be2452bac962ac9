"""Every config composes: each model and loss file, and every train.py and evaluate.py command in the README."""
import os
import re
import shlex

import pytest
from omegaconf import OmegaConf

import train
from helpers import ROOT, compose_config

MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, 'config', 'model')))
LOSSES = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, 'config', 'loss')))


def readme_commands():
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = f.read().replace('\\\n', ' ')  # join shell line continuations
    commands = [line.strip() for line in text.splitlines() if re.search(r'\btrain\.py\b', line) and
                re.match(r'\s*(python|torchrun|srun)', line)]
    assert len(commands) >= 4, 'README lost its train.py commands'
    return commands


@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('loss', LOSSES)
def test_every_model_and_loss_composes(model, loss):
    config = compose_config([f'model={model}', f'loss={loss}', 'exp_name=x', 'loss.beta=0.1'] if loss != 'sft'
                            else [f'model={model}', f'loss={loss}', 'exp_name=x'])
    missing = train.missing_keys(config)
    assert missing == (['model.name_or_path'] if model == 'blank_model' else [])
    if model != 'blank_model':
        train.check_config(config)


def test_tdpo2_is_the_default_tdpo():
    config = compose_config(['loss=tdpo', 'exp_name=x'])
    assert config.loss.if_tdpo2 is True and config.loss.alpha == 0.5 and config.loss.beta == 0.1


@pytest.mark.parametrize('command', readme_commands())
def test_readme_command_composes(command):
    args = shlex.split(command)
    overrides = [a for a in args[args.index(next(a for a in args if a.endswith('train.py'))) + 1:] if '=' in a]
    if '-m' in args:  # a sweep: compose its first run
        overrides = [o if '[' in o else o.split(',')[0] for o in overrides]
    config = compose_config(overrides)
    train.check_config(config)
    OmegaConf.to_container(config, resolve=True)  # every interpolation resolves (the run dir is only named)


def readme_evaluate_commands():
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = f.read().replace('\\\n', ' ')
    commands = [line.strip() for line in text.splitlines() if re.match(r'\s*python\b.*\bevaluate\.py\b', line)]
    assert commands, 'README lost its evaluate.py commands'
    return commands


@pytest.mark.parametrize('command', readme_evaluate_commands())
def test_readme_evaluate_command_composes(command):
    import evaluate
    from hydra import compose, initialize_config_dir
    args = shlex.split(command)
    overrides = [a for a in args[args.index(next(a for a in args if a.endswith('evaluate.py'))) + 1:] if '=' in a]
    if '-m' in args:
        overrides = [o.split(',')[0] for o in overrides]
    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        config = compose('evaluate', overrides=overrides)
    assert not [k for k in ('policy', 'reference', 'prompts') if OmegaConf.is_missing(config, k)]
    assert config.reward in evaluate.REWARDS
    OmegaConf.to_container(config, resolve=True)
