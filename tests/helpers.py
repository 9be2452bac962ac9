"""Shared test fixtures: a synthetic HH-format data file and composed configs for model=tiny."""
import json
import os

from hydra import compose, initialize_config_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, '.cache')  # the dequantized model and tokenizer are cached here once
HH_SAMPLE = os.path.join(ROOT, '..', 'shared', 'data', 'hh-rlhf-harmless-sample', 'rows.jsonl.gz')


def write_hh_file(path, n=48):
    """n HH-format rows with distinct prompts; chosen answers are longer and polite."""
    with open(path, 'w') as f:
        for i in range(n):
            prompt = f'\n\nHuman: Tell me something about the number {i}.\n\nAssistant:'
            f.write(json.dumps({'chosen': prompt + f' Gladly! {i} is a fine number, {i % 7} more than a multiple of 7.',
                                'rejected': prompt + ' No.'}) + '\n')
    return str(path)


def compose_config(overrides):
    import train  # registers the resolvers
    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        return compose('config', overrides=list(overrides))
