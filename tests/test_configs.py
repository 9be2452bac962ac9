"""Every config composes: each model and loss file, and every train.py and evaluate.py command in the README and
the guides it links (docs/, demo/README.md, bench/README.md)."""
import os
import re
import shlex

import pytest
from omegaconf import OmegaConf

import models
import run_config
from helpers import ROOT, compose_config
from sharded_trainers import TRAINERS

MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, 'config', 'model')))
LOSSES = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, 'config', 'loss')))


GUIDES = ['README.md', 'demo/README.md', 'bench/README.md'] + sorted(
    os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs')) if f.endswith('.md'))


def documented_text() -> str:
    """The README and the guides it links, shell line continuations joined."""
    text = ''
    for name in GUIDES:
        with open(os.path.join(ROOT, name)) as f:
            text += f.read().replace('\\\n', ' ') + '\n'
    return text


def readme_commands():
    text = documented_text()
    commands = [line.strip() for line in text.splitlines() if re.search(r'\btrain\.py\b', line) and
                re.match(r'\s*(python|torchrun|srun)', line)]
    assert len(commands) >= 4, 'README lost its train.py commands'
    return commands


@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('loss', LOSSES)
def test_every_model_and_loss_composes(model, loss):
    config = compose_config([f'model={model}', f'loss={loss}', 'exp_name=x', 'loss.beta=0.1'] if loss != 'sft'
                            else [f'model={model}', f'loss={loss}', 'exp_name=x'])
    missing = run_config.missing_keys(config)
    assert missing == (['model.name_or_path'] if model == 'blank_model' else [])
    if model != 'blank_model':
        run_config.check_config(config, trainers=TRAINERS)


# each bad value (and the key it must name) crashed later or trained on nothing before check_config caught it
BAD_VALUES = [
    (['batch_size=0'], 'batch_size'), (['batch_size=-2'], 'batch_size'), (['batch_size=2.5'], 'batch_size'),
    (['batch_size=abc'], 'batch_size'), (['gradient_accumulation_steps=0'], 'gradient_accumulation_steps'),
    (['eval_batch_size=0'], 'eval_batch_size'), (['lr=-1'], 'lr'), (['lr=0'], 'lr'), (['optimizer=Adagrad'], 'optimizer'),
    (['n_epochs=0', 'n_examples=null'], 'n_epochs'), (['n_epochs=0'], 'n_epochs'), (['n_examples=-4'], 'n_examples'),
    (['n_examples=2'], 'n_examples'), (['n_eval_examples=-1'], 'n_eval_examples'),
    (['n_eval_model_samples=-1'], 'n_eval_model_samples'), (['warmup_steps=-1'], 'warmup_steps'),
    (['max_grad_norm=0'], 'max_grad_norm'), (['max_grad_norm=-1'], 'max_grad_norm'), (['max_length=0'], 'max_length'),
    (['max_prompt_length=0'], 'max_prompt_length'), (['eval_every=null'], 'eval_every'), (['eval_every=0'], 'eval_every'),
    (['checkpoint_every=-8'], 'checkpoint_every'), (['keep_checkpoints=0'], 'keep_checkpoints'),
    (['max_nonfinite_updates=0'], 'max_nonfinite_updates'), (['seed=-1'], 'seed'), (['eval_fraction=1.0'], 'eval_fraction'),
    (['eval_fraction=-0.1'], 'eval_fraction'), (['fsdp_port=70000'], 'fsdp_port'),
    (['loss=tdpo', 'loss.beta=-0.1'], 'loss.beta'), (['loss=tdpo', 'loss.alpha=-1'], 'loss.alpha'),
    (['loss=dpo', 'loss.beta=0.1', 'loss.label_smoothing=0.7'], 'loss.label_smoothing'),
    (['loss=dpo', 'loss.beta=0.1', 'loss.divergence=js'], 'loss.divergence'),
    (['datasets=[]'], 'datasets'), (['datasets=hh'], 'datasets'), (['local_dirs=[]'], 'local_dirs'),
    (['eval_datasets=[]'], 'eval_datasets'), (['model.reference_dtype=bf16'], 'model.reference_dtype'),
    (['model.policy_dtype=fp32'], 'model.policy_dtype'), (['model.fsdp_policy_mp=half'], 'model.fsdp_policy_mp'),
]


@pytest.mark.parametrize('overrides, key', BAD_VALUES)
def test_bad_values_are_one_config_error_naming_the_key(overrides, key):
    with pytest.raises(run_config.ConfigError) as error:
        run_config.check_config(compose_config(['model=tiny', 'exp_name=x', *overrides]), trainers=TRAINERS)
    message = str(error.value)
    assert '\n' not in message and re.search(rf'(^|\W){re.escape(key)}\W', message), message


@pytest.mark.parametrize('overrides', [
    ['n_eval_examples=0'], ['n_eval_examples=null'], ['n_eval_model_samples=0'], ['warmup_steps=0'], ['seed=0'],
    ['n_epochs=null', 'n_examples=4'], ['n_examples=4', 'checkpoint_every=null'], ['eval_fraction=0'],
    ['max_grad_norm=inf'], ['batch_size=1', 'eval_every=1'], ['fsdp_port=29500'], ['loss=tdpo', 'loss.alpha=0'],
    ['loss=dpo', 'loss.beta=0.1', 'loss.label_smoothing=0.1', 'loss.divergence=forward_kl'],
    ['datasets=[hh,shp]', 'eval_datasets=[hh]'], ['eval_datasets=null'],
])
def test_edge_values_that_train_pass(overrides):
    run_config.check_config(compose_config(['model=tiny', 'exp_name=x', *overrides]), trainers=TRAINERS)


def test_without_the_trainer_registry_the_trainer_checks_are_skipped():
    """`python preference_datasets.py` builds no trainer: check_config without `trainers` skips what only the
    trainer classes decide (the trainer's name, LoRA support), and keeps the other checks."""
    for overrides, message in [(['trainer=NoSuchTrainer'], "unknown trainer='NoSuchTrainer'"),
                               (['lora.r=4', 'trainer=TensorParallelTrainer'], 'does not train LoRA adapters')]:
        config = compose_config(['model=tiny', 'exp_name=x', 'loss=tdpo', *overrides])
        with pytest.raises(run_config.ConfigError, match=re.escape(message)):
            run_config.check_config(config, trainers=TRAINERS)
        run_config.check_config(config)
    with pytest.raises(run_config.ConfigError, match='batch_size'):
        run_config.check_config(compose_config(['model=tiny', 'exp_name=x', 'batch_size=0']))


def test_train_keeps_its_old_import_paths():
    """Scripts and users import these from train; train.check_config checks the trainer, as train.py does."""
    import run_dirs
    import train
    assert train.ConfigError is run_config.ConfigError and train.compose_config is run_config.compose_config
    assert train.missing_keys is run_config.missing_keys and train.TRAINERS is TRAINERS
    assert (train.resume_run_dir, train.choose_checkpoint, train.open_run_dir, train.remove_if_unused) == \
        (run_dirs.resume_run_dir, run_dirs.choose_checkpoint, run_dirs.open_run_dir, run_dirs.remove_if_unused)
    with pytest.raises(run_config.ConfigError, match="unknown trainer='NoSuchTrainer'"):
        train.check_config(compose_config(['model=tiny', 'exp_name=x', 'trainer=NoSuchTrainer']))
    with pytest.raises(run_config.ConfigError, match='trainer=BasicTrainer runs in one process, not 2'):
        train.check_config(compose_config(['model=tiny', 'exp_name=x']), 2)


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
    run_config.check_config(config, trainers=TRAINERS)
    OmegaConf.to_container(config, resolve=True)  # every interpolation resolves (the run dir is only named)


def readme_evaluate_commands():
    text = documented_text()
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


@pytest.mark.parametrize('state, problem', [
    ({'not_a_weight': 'two'}, r'\d+ of its weights missing \(first: .*1 unknown to it \(first: \[.not_a_weight.\]'),
    ({'model.embed_tokens.weight': 'wide'}, r'size mismatch for model\.embed_tokens\.weight'),
])
def test_an_archive_that_does_not_fit_the_model_is_one_config_error(tmp_path, state, problem):
    """model.archive with weights of another model (trusted or not) stops with one line naming the key."""
    import torch
    from helpers import CACHE
    config = compose_config(['model=tiny', 'exp_name=x', 'loss=sft', f'local_dirs=[{CACHE}]',
                             f'model.archive={tmp_path / "policy.pt"}'])
    tensors = {'one': torch.zeros(3), 'two': torch.zeros(2), 'wide': torch.zeros(7, 5)}
    torch.save({'step_idx': 0, 'state': {k: tensors[v] for k, v in state.items()}, 'metrics': {}}, tmp_path / 'policy.pt')
    with pytest.raises(run_config.ConfigError) as error:
        models.build_models(config, TRAINERS[config.trainer])
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'model.archive={tmp_path / "policy.pt"} does not fit'), message
    assert re.search(problem, message), message


def _anchors(path: str) -> set:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation but '-' and '_' dropped,
    spaces as '-'."""
    with open(path) as f:
        headings = [line.lstrip('#').strip() for line in f if line.startswith('#')]
    return {re.sub(r'[^\w\- ]', '', h.lower()).replace(' ', '-') for h in headings}


@pytest.mark.parametrize('guide', GUIDES + ['tests/README.md'])
def test_every_relative_link_resolves(guide):
    """Each [text](path#anchor) of the guide that is not a URL names a file or directory of the repository and,
    with an anchor, a heading of that file."""
    with open(os.path.join(ROOT, guide)) as f:
        links = re.findall(r'\]\(([^)\s]+)\)', f.read())
    broken = []
    for link in links:
        if re.match(r'[a-z]+:', link):
            continue
        target, _, anchor = link.partition('#')
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(guide), target)) if target else os.path.join(ROOT, guide)
        if not os.path.exists(path) or (anchor and path.endswith('.md') and anchor not in _anchors(path)):
            broken.append(link)
    assert not broken, f'{guide}: {broken}'
