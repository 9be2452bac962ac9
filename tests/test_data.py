"""preference_datasets.py: parsing of real hh-rlhf rows and local files, the held-out split, tokenization
with the real (SmolLM2) tokenizer, masking, truncation, collation, batch iteration, caching, and the
error messages. Expected values are derived here from the raw rows, the tokenizer itself or by hand,
never from the output of the code under test."""
import contextlib
import glob
import gzip
import json
import os
import shutil
import signal
import time
from collections import Counter

import pytest
import torch

import preference_datasets as pd
from batches import batch_iterator, collate
from preference_datasets import DataError, Example, get_dataset, tokenize_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
HH_SAMPLE = os.path.join(ROOT, '..', 'shared', 'data', 'hh-rlhf-harmless-sample', 'rows.jsonl.gz')
A = '\n\nAssistant:'
# 0-based indices of the rows on lines 1255 and 1689 of the sample, whose dialogues part before chosen's
# last Assistant turn
PARTING_ROWS = (1254, 1688)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tokenizer():
    from hydra import compose, initialize_config_dir
    import run_config  # noqa: F401  registers the pkg_dir resolver
    import model_loading
    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        cfg = compose('config', overrides=['model=tiny', 'exp_name=t'])
    return model_loading.load_tokenizer(cfg.model, os.path.join(ROOT, '.cache'))


@pytest.fixture(scope='module')
def raw_rows():
    if not os.path.exists(HH_SAMPLE):
        pytest.skip(f'real hh-rlhf sample not found at {os.path.normpath(HH_SAMPLE)}')
    with gzip.open(HH_SAMPLE, 'rt', encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def expected_split(row):
    """(prompt, chosen response, rejected response) of a raw HH row, derived independently: the prompt is
    the longest prefix of chosen that ends with '\\n\\nAssistant:' and that rejected also starts with."""
    chosen, rejected = row['chosen'], row['rejected']
    best = None
    pos = chosen.find(A)
    while pos != -1:
        candidate = chosen[:pos + len(A)]
        if rejected.startswith(candidate):
            best = candidate
        pos = chosen.find(A, pos + 1)
    assert best is not None
    return best, chosen[len(best):], rejected[len(best):]


@pytest.fixture(scope='module')
def hh_splits(raw_rows, tokenizer):
    """train and test dicts of the real sample with eval_fraction=0.2, plus the expected triples."""
    train = get_dataset(HH_SAMPLE, 'train', tokenizer, eval_fraction=0.2)
    test = get_dataset(HH_SAMPLE, 'test', tokenizer, eval_fraction=0.2)
    expected = [expected_split(r) for r in raw_rows]
    prefill_ids(tokenizer, [(p, r) for p, c, rj in expected for r in (c, rj)])
    return train, test, expected


_SPLITS = {}


def split_ids(tokenizer, prompt, response):
    """(prompt ids, response ids) cut from ONE tokenization of the whole text prompt + response, where its
    tokens' character offsets reach the prompt's end (memoized). Not the code's call (it tokenizes prompt and
    response separately): the cut must fall on a token boundary, each side must decode to its own text, and
    plain text must give no special-token id (text like '<|im_end|>' is data)."""
    if (prompt, response) not in _SPLITS:
        prefill_ids(tokenizer, [(prompt, response)])
    whole, k = _SPLITS[(prompt, response)]
    return list(whole[:k]), list(whole[k:])


def prefill_ids(tokenizer, pairs):
    pairs = sorted(set(pairs) - set(_SPLITS))
    if not pairs:
        return
    encoded = tokenizer([p + r for p, r in pairs], add_special_tokens=False, split_special_tokens=True,
                        return_offsets_mapping=True)
    specials = set(tokenizer.all_special_ids)
    for (prompt, response), whole, offsets in zip(pairs, encoded['input_ids'], encoded['offset_mapping']):
        k = sum(start < len(prompt) for start, _ in offsets)
        assert tokenizer.decode(whole[:k]) == prompt and tokenizer.decode(whole[k:]) == response, (prompt, response)
        assert not specials & set(whole), (prompt, response)
        _SPLITS[(prompt, response)] = (whole, k)


def pair_ids(tokenizer, prompt, chosen, rejected, eos):
    """(prompt ids, [chosen ids + EOS, rejected ids + EOS]) from the whole texts; the prompt cuts the same from both."""
    p, c = split_ids(tokenizer, prompt, chosen)
    p2, r = split_ids(tokenizer, prompt, rejected)
    assert p == p2
    return p, [c + [eos], r + [eos]]


def triples(data):
    """Counter of (prompt, chosen, rejected) over a data-set dict."""
    return Counter((p, e['responses'][i], e['responses'][j]) for p, e in data.items() for i, j in e['pairs'])


def example_triples(examples):
    return Counter((e.prompt, e.chosen, e.rejected) for e in examples)


def check_batch(batch, examples, pad, kinds):
    """Every tensor of a collated batch, position by position, against the examples' token ids."""
    n = len(examples)
    assert batch['prompt'] == [e.prompt for e in examples]
    width = max(len(e.prompt_ids) for e in examples)
    P, PM = batch['prompt_input_ids'], batch['prompt_attention_mask']
    assert P.shape == PM.shape == (n, width) and P.dtype == torch.long
    P, PM = P.tolist(), PM.tolist()
    for i, e in enumerate(examples):
        k = len(e.prompt_ids)
        assert P[i] == [pad] * (width - k) + e.prompt_ids            # left-padded
        assert PM[i] == [0] * (width - k) + [1] * k
    for kind in ('chosen', 'rejected'):
        if kind not in kinds:
            assert f'{kind}_input_ids' not in batch and f'{kind}_labels' not in batch
            continue
        X, M, Y = batch[f'{kind}_input_ids'], batch[f'{kind}_attention_mask'], batch[f'{kind}_labels']
        width = max(len(e.prompt_ids) + len(getattr(e, f'{kind}_ids')) for e in examples)
        assert X.shape == M.shape == Y.shape == (n, width)
        X, M, Y = X.tolist(), M.tolist(), Y.tolist()
        for i, e in enumerate(examples):
            r = getattr(e, f'{kind}_ids')
            k, m = len(e.prompt_ids), len(e.prompt_ids) + len(r)
            assert X[i] == e.prompt_ids + r + [pad] * (width - m)
            assert M[i] == [1] * m + [0] * (width - m)
            # -100 exactly on the prompt and the padding, the response ids elsewhere
            assert Y[i] == [-100] * k + r + [-100] * (width - m) and min(r) >= 0
            text = getattr(e, kind)
            assert batch[kind][i] == e.prompt + text
            assert batch[f'{kind}_response_only'][i] == text


@contextlib.contextmanager
def time_limit(seconds):
    def handler(signum, frame):
        raise TimeoutError(f'took more than {seconds} s (an endless loop?)')
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_lines(path, lines):
    path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return str(path)


# ---------------------------------------------------------------------------------------------
# Real hh-rlhf rows: parsing and the held-out split
# ---------------------------------------------------------------------------------------------

def test_hh_rows_parse_into_prompt_and_responses(raw_rows, hh_splits):
    train, test, expected = hh_splits
    assert len(raw_rows) == 1800
    for data in (train, test):
        for prompt, entry in data.items():
            assert prompt.endswith(A)
            assert entry['truncation_mode'] == 'keep_end'
            assert len(entry['responses']) == 2 * len(entry['pairs'])
    # every row appears exactly once, as (prompt, chosen response, rejected response)
    assert triples(train) + triples(test) == Counter(expected)
    # and prompt + response is the row's dialogue
    for row, (prompt, chosen, rejected) in zip(raw_rows, expected):
        assert prompt + chosen == row['chosen'] and prompt + rejected == row['rejected']
        assert prompt in train or prompt in test


def test_hh_sft_target_is_the_chosen_response(raw_rows, hh_splits):
    train, test, expected = hh_splits
    last_chosen = {}
    for prompt, chosen, _ in expected:
        last_chosen[prompt] = chosen          # the reference overwrites: the last row of a prompt wins
    assert len(last_chosen) < len(expected)   # the sample has prompts with several rows
    for data in (train, test):
        for prompt, entry in data.items():
            assert entry['sft_target'] == last_chosen[prompt]


def test_hh_rows_that_part_early_split_at_the_shared_part(raw_rows, hh_splits):
    train, test, _ = hh_splits
    for index in PARTING_ROWS:
        chosen, rejected = raw_rows[index]['chosen'], raw_rows[index]['rejected']
        chosen_prompt = chosen[:chosen.rfind(A) + len(A)]
        assert not rejected.startswith(chosen_prompt)          # the reference's cut would be wrong here
        shared = rejected[:rejected.rfind(A) + len(A)]          # rejected's last Assistant turn is shared
        assert chosen.startswith(shared) and shared.count(A) == 2
        data = train if shared in train else test
        assert shared in data and chosen_prompt not in train and chosen_prompt not in test
        pairs = {(data[shared]['responses'][i], data[shared]['responses'][j]) for i, j in data[shared]['pairs']}
        assert (chosen[len(shared):], rejected[len(shared):]) in pairs
        assert A in chosen[len(shared):]                       # chosen's extra turns stay in its response
    # no other row parts early
    others = [i for i, r in enumerate(raw_rows) if not r['rejected'].startswith(r['chosen'][:r['chosen'].rfind(A) + len(A)])]
    assert others == list(PARTING_ROWS)


def test_hh_split_is_disjoint_covering_and_deterministic(raw_rows, tokenizer, hh_splits):
    train, test, expected = hh_splits
    prompts = {p for p, _, _ in expected}
    assert not set(train) & set(test)
    assert set(train) | set(test) == prompts
    assert 0.1 * len(prompts) < len(test) < 0.3 * len(prompts)     # about eval_fraction=0.2
    again = get_dataset(HH_SAMPLE, 'test', tokenizer, eval_fraction=0.2)
    assert again == test
    # a smaller held-out share is a subset of a larger one (a fixed per-prompt hash, not a shuffle)
    small = get_dataset(HH_SAMPLE, 'test', tokenizer, eval_fraction=0.05)
    assert 0 < len(small) < len(test) and set(small) <= set(test)


# ---------------------------------------------------------------------------------------------
# Tokenization, truncation, masking and collation on real rows
# ---------------------------------------------------------------------------------------------

def test_tokenize_untruncated_real_rows(tokenizer, hh_splits):
    train, _, _ = hh_splits
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    examples = tokenize_dataset(train, tokenizer, max_length=100_000, max_prompt_length=50_000, sft_mode=False, silent=True)
    assert example_triples(examples) == triples(train)        # chosen/rejected paired as in the rows
    for e in examples:
        assert e.prompt in train
        p, rs = pair_ids(tokenizer, e.prompt, e.chosen, e.rejected, eos)
        assert e.prompt_ids == p
        assert [e.chosen_ids, e.rejected_ids] == rs
        assert eos not in e.prompt_ids
    sample = examples[:50]
    assert all(tokenizer.decode(e.prompt_ids + e.chosen_ids[:-1]) == e.prompt + e.chosen for e in sample)
    for start in range(0, len(examples), 64):
        chunk = examples[start:start + 64]
        check_batch(collate(chunk, pad), chunk, pad, ('chosen', 'rejected'))


@pytest.mark.parametrize('max_length,max_prompt_length', [(128, 64), (96, 80)])
def test_keep_end_truncation_of_real_dialogues(tokenizer, hh_splits, max_length, max_prompt_length):
    train, _, _ = hh_splits
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    examples = tokenize_dataset(train, tokenizer, max_length, max_prompt_length, sft_mode=False, silent=True)
    assert example_triples(examples) == triples(train)
    seen = Counter()
    for e in examples:
        p, rs = pair_ids(tokenizer, e.prompt, e.chosen, e.rejected, eos)
        longest = max(map(len, rs))
        got = [e.chosen_ids, e.rejected_ids]
        assert len(e.prompt_ids) + max(map(len, got)) <= max_length
        if len(p) + longest <= max_length:
            seen['whole'] += 1
            assert e.prompt_ids == p and got == rs
            continue
        assert e.prompt_ids == p[-max_prompt_length:]            # the END of the dialogue is kept
        assert tokenizer.decode(e.prompt_ids).endswith(A)
        if len(e.prompt_ids) + longest <= max_length:
            seen['prompt cut'] += 1
            assert got == rs
        else:
            seen['responses cut'] += 1
            limit = max_length - max_prompt_length
            assert got == [r[:limit] for r in rs]
            assert all(g[-1] != eos for r, g in zip(rs, got) if len(r) > limit)   # a cut response has no EOS
    assert seen['whole'] and seen['prompt cut'] and seen['responses cut'], seen   # every case exercised
    for start in range(0, len(examples), 128):
        chunk = examples[start:start + 128]
        check_batch(collate(chunk, pad), chunk, pad, ('chosen', 'rejected'))


def test_keep_start_truncation_of_explicit_rows(tokenizer, raw_rows, tmp_path):
    """The real rows rewritten as explicit prompt/chosen/rejected rows are truncated keeping the START."""
    path = tmp_path / 'explicit.jsonl'
    # explicit rows must not have empty fields (4 real HH rows have an empty chosen turn)
    rows = [t for t in (expected_split(r) for r in raw_rows[:600]) if all(x.strip() for x in t)]
    write_lines(path, [json.dumps({'prompt': p, 'chosen': c, 'rejected': r}) for p, c, r in rows])
    data = get_dataset(str(path), 'train', tokenizer, eval_fraction=0.0)
    assert triples(data) == Counter(rows)
    assert all(e['truncation_mode'] == 'keep_start' for e in data.values())
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    max_length, max_prompt_length = 128, 64
    examples = tokenize_dataset(data, tokenizer, max_length, max_prompt_length, sft_mode=False, silent=True)
    n_cut = 0
    for e in examples:
        p, rs = pair_ids(tokenizer, e.prompt, e.chosen, e.rejected, eos)
        if len(p) + max(map(len, rs)) > max_length:
            n_cut += len(p) > max_prompt_length
            assert e.prompt_ids == p[:max_prompt_length]
            if len(e.prompt_ids) + max(map(len, rs)) > max_length:
                rs = [r[:max_length - max_prompt_length] for r in rs]
        else:
            assert e.prompt_ids == p
        assert [e.chosen_ids, e.rejected_ids] == rs
    assert n_cut > 10
    check_batch(collate(examples[:32], pad), examples[:32], pad, ('chosen', 'rejected'))


def test_sft_mode_one_example_per_prompt(tokenizer, hh_splits):
    train, _, expected = hh_splits
    last_chosen = {p: c for p, c, _ in expected}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    examples = tokenize_dataset(train, tokenizer, 100_000, 50_000, sft_mode=True, silent=True)
    assert sorted(e.prompt for e in examples) == sorted(train)
    for e in examples:
        assert e.rejected is None and e.rejected_ids is None
        assert e.chosen == last_chosen[e.prompt]
        p, c = split_ids(tokenizer, e.prompt, e.chosen)
        assert e.prompt_ids == p and e.chosen_ids == c + [eos]
    batch = collate(examples[:40], pad)
    check_batch(batch, examples[:40], pad, ('chosen',))
    assert not any(k.startswith('rejected') for k in batch)


def test_eos_text_is_plain_text(tokenizer, tmp_path):
    eos_text, eos, pad = tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert eos_text == '<|im_end|>'
    path = write_lines(tmp_path / 'eos.jsonl', [
        json.dumps({'prompt': f'Say {eos_text} twice:', 'chosen': f' {eos_text} {eos_text}', 'rejected': f'{eos_text}'}),
        json.dumps({'chosen': f'\n\nHuman: what is {eos_text}?\n\nAssistant: a token{eos_text}',
                    'rejected': f'\n\nHuman: what is {eos_text}?\n\nAssistant: no idea'}),
    ])
    data = get_dataset(path, 'train', tokenizer, eval_fraction=0.0)
    assert len(data) == 2
    examples = tokenize_dataset(data, tokenizer, 512, 256, sft_mode=False, silent=True)
    assert len(examples) == 2
    for e in examples:
        assert eos not in e.prompt_ids
        for text, r in ((e.chosen, e.chosen_ids), (e.rejected, e.rejected_ids)):
            assert r[-1] == eos and eos not in r[:-1]
            assert tokenizer.decode(r[:-1]) == text
        assert tokenizer.decode(e.prompt_ids) == e.prompt
    check_batch(collate(examples, pad), examples, pad, ('chosen', 'rejected'))


# ---------------------------------------------------------------------------------------------
# Local loaders
# ---------------------------------------------------------------------------------------------

HH_EXPECTED = {
    '\n\nHuman: What is the capital of France?\n\nAssistant:': {
        'responses': [' Paris.', ' London.', ' The capital of France is Paris.', ' Berlin.'],
        'pairs': [(0, 1), (2, 3)], 'sft_target': ' The capital of France is Paris.', 'truncation_mode': 'keep_end'},
    '\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:': {
        'responses': [' Why did the chicken cross the road? To get to the other side.', ' No.'],
        'pairs': [(0, 1)], 'sft_target': ' Why did the chicken cross the road? To get to the other side.',
        'truncation_mode': 'keep_end'},
    '\n\nHuman: Can you help me?\n\nAssistant:': {
        'responses': [" Sure.\n\nHuman: Thanks\n\nAssistant: You're welcome.", ' No.'],
        'pairs': [(0, 1)], 'sft_target': " Sure.\n\nHuman: Thanks\n\nAssistant: You're welcome.",
        'truncation_mode': 'keep_end'},
}


@pytest.mark.parametrize('suffix', ['.jsonl', '.jsonl.gz', '.json'])
def test_local_hh_format_in_every_file_kind(tokenizer, tmp_path, suffix):
    source = os.path.join(FIXTURES, 'hh_rows.jsonl')
    path = str(tmp_path / f'rows{suffix}')
    if suffix == '.jsonl':
        shutil.copy(source, path)
    elif suffix == '.jsonl.gz':
        with open(source, 'rb') as f, gzip.open(path, 'wb') as g:
            g.write(f.read())
    else:
        with open(source, encoding='utf-8') as f, open(path, 'w', encoding='utf-8') as g:
            json.dump([json.loads(line) for line in f if line.strip()], g)
    assert get_dataset(path, 'train', tokenizer, eval_fraction=0.0) == HH_EXPECTED
    assert get_dataset(path, 'test', tokenizer, eval_fraction=1.0) == HH_EXPECTED
    with pytest.raises(DataError, match='no test pairs'):
        get_dataset(path, 'test', tokenizer, eval_fraction=0.0)


def test_local_explicit_string_rows(tokenizer):
    data = get_dataset(os.path.join(FIXTURES, 'explicit_rows.json'), 'train', tokenizer, eval_fraction=0.0)
    assert data == {
        'Translate to French: cat\n': {'responses': ['chat', 'chien'], 'pairs': [(0, 1)], 'sft_target': 'chat',
                                       'truncation_mode': 'keep_start'},
        'Write a haiku about rain.': {
            'responses': [' Soft rain on the roof,\nthe gutter hums a low song,\nthe street shines like glass.', ' Rain.'],
            'pairs': [(0, 1)], 'sft_target': ' Soft rain on the roof,\nthe gutter hums a low song,\nthe street shines like glass.',
            'truncation_mode': 'keep_start'}}


def spelled_ids(tokenizer, text, spelled):
    """Ids of a hand-written byte-level BPE spelling (Ġ a space, Ċ a newline), looked up in the vocabulary."""
    assert ''.join(spelled).replace('Ġ', ' ').replace('Ċ', '\n') == text
    ids = tokenizer.convert_tokens_to_ids(spelled)
    assert tokenizer.unk_token_id not in ids
    return ids


def test_token_ids_of_rows_by_hand(tokenizer, tmp_path):
    """Prompt and responses tokenized separately, as plain text, no BOS, one EOS after each response: the ids
    of hand-written spellings, not of a tokenizer call."""
    eos = tokenizer.eos_token_id
    data = get_dataset(os.path.join(FIXTURES, 'explicit_rows.json'), 'train', tokenizer, eval_fraction=0.0)
    e = next(e for e in tokenize_dataset(data, tokenizer, 512, 256, sft_mode=False, silent=True)
             if e.prompt == 'Translate to French: cat\n')
    assert e.prompt_ids == spelled_ids(tokenizer, e.prompt, ['Trans', 'late', 'Ġto', 'ĠFrench', ':', 'Ġcat', 'Ċ'])
    assert e.chosen_ids == spelled_ids(tokenizer, 'chat', ['chat']) + [eos]
    assert e.rejected_ids == spelled_ids(tokenizer, 'chien', ['ch', 'ien']) + [eos]
    path = write_lines(tmp_path / 'eos.jsonl', [json.dumps({'prompt': 'Say <|im_end|> twice:', 'chosen': ' Paris.',
                                                            'rejected': ' <|im_end|>'})])
    e, = tokenize_dataset(get_dataset(path, 'train', tokenizer, eval_fraction=0.0), tokenizer, 512, 256,
                          sft_mode=False, silent=True)
    im_end = ['<', '|', 'im', '_', 'end', '|', '>']   # the text of the EOS token, spelled as text
    assert e.prompt_ids == spelled_ids(tokenizer, e.prompt, ['Say', 'Ġ' + im_end[0], *im_end[1:], 'Ġtwice', ':'])
    assert e.chosen_ids == spelled_ids(tokenizer, ' Paris.', ['ĠParis', '.']) + [eos]
    assert e.rejected_ids == spelled_ids(tokenizer, ' <|im_end|>', ['Ġ' + im_end[0], *im_end[1:]]) + [eos]


def test_local_chat_message_rows(tokenizer):
    data = get_dataset(os.path.join(FIXTURES, 'chat_rows.jsonl'), 'train', tokenizer, eval_fraction=0.0)
    assert len(data) == 2
    first = ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
             '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n')
    entry = {k: v for k, v in data[first].items() if not k.endswith('_ids')}
    # chat prompts keep their end when truncated: the generation prompt the response follows must stay
    assert entry == {'responses': ['4', '5'], 'pairs': [(0, 1)], 'sft_target': '4', 'truncation_mode': 'keep_end'}
    with open(os.path.join(FIXTURES, 'chat_rows.jsonl'), encoding='utf-8') as f:
        row = [json.loads(line) for line in f][1]
    second = tokenizer.apply_chat_template(row['prompt'], tokenize=False, add_generation_prompt=True)
    assert second.endswith('<|im_start|>assistant\n') and 'Name a color.' in second
    assert data[second]['responses'] == ['Blue.', 'I cannot answer that.']
    for key in ('chosen', 'rejected'):   # prompt + response + end of turn is the whole rendered chat
        full = tokenizer.apply_chat_template(row['prompt'] + row[key], tokenize=False)
        response = data[second]['responses'][0 if key == 'chosen' else 1]
        assert full.rstrip('\n') == second + response + tokenizer.eos_token
    # the response is trained with exactly one end-of-turn token (the template's, which is EOS here), and the
    # prompt is tokenized as at inference: the template's special tokens are special
    examples = tokenize_dataset(data, tokenizer, 512, 256, sft_mode=False, silent=True)
    by_hand = {'4': ['4'], '5': ['5'], 'Blue.': ['Blue', '.'], 'I cannot answer that.': ['I', 'Ġcannot', 'Ġanswer', 'Ġthat', '.']}
    for e in examples:
        spelled = by_hand[e.chosen]   # byte-level BPE spelling: Ġ is a space
        assert ''.join(spelled).replace('Ġ', ' ') == e.chosen
        assert e.chosen_ids == tokenizer.convert_tokens_to_ids(spelled) + [tokenizer.eos_token_id]
        assert e.chosen_ids.count(tokenizer.eos_token_id) == 1
        assert e.prompt_ids == tokenizer(e.prompt, add_special_tokens=False)['input_ids']


def test_mixed_formats_keep_their_own_truncation_mode(tokenizer, tmp_path):
    for order in (1, -1):
        rows = [json.dumps({'prompt': 'Q: explicit?', 'chosen': ' yes', 'rejected': ' no'}),
                json.dumps({'chosen': '\n\nHuman: hh?\n\nAssistant: yes', 'rejected': '\n\nHuman: hh?\n\nAssistant: no'})]
        path = write_lines(tmp_path / f'mixed{order}.jsonl', rows[::order])
        data = get_dataset(path, 'train', tokenizer, eval_fraction=0.0)
        assert data['Q: explicit?']['truncation_mode'] == 'keep_start'
        assert data['\n\nHuman: hh?\n\nAssistant:']['truncation_mode'] == 'keep_end'


# ---------------------------------------------------------------------------------------------
# Errors name the file and line
# ---------------------------------------------------------------------------------------------

GOOD = json.dumps({'prompt': 'p', 'chosen': 'c', 'rejected': 'r'})


@pytest.mark.parametrize('bad,words', [
    ('{"prompt": "p", "chosen": "c", ', ['malformed JSON']),
    (json.dumps({'prompt': 'p', 'chosen': 'c'}), ['missing field', 'rejected']),
    (json.dumps({'rejected': 'x'}), ['missing field', 'chosen']),
    (json.dumps({'chosen': '\n\nHuman: hi\n\nHelper: yo', 'rejected': '\n\nHuman: hi\n\nHelper: no'}), ['Assistant']),
    (json.dumps(['prompt', 'chosen', 'rejected']), ['JSON object', 'list']),
    (json.dumps('just a string'), ['JSON object', 'str']),
    (json.dumps({'chosen': 1, 'rejected': 2}), ['text or a list of chat messages', 'number']),
    (json.dumps({'prompt': 'p', 'chosen': [{'role': 'assistant', 'content': 'c'}], 'rejected': 'r'}), ['chosen']),
    (json.dumps({'prompt': 'p', 'chosen': 3, 'rejected': 'r'}), ['chosen']),
])
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, bad, words):
    path = write_lines(tmp_path / 'bad.jsonl', [GOOD, '', bad, GOOD])
    with pytest.raises(DataError) as info:
        get_dataset(path, 'train', tokenizer, eval_fraction=0.0)
    message = str(info.value)
    assert f'{path}:3' in message, message
    for word in words:
        assert word in message, message


def test_json_file_errors(tokenizer, tmp_path):
    not_a_list = tmp_path / 'obj.json'
    not_a_list.write_text(json.dumps({'prompt': 'p', 'chosen': 'c', 'rejected': 'r'}))
    with pytest.raises(DataError, match='list'):
        get_dataset(str(not_a_list), 'train', tokenizer, eval_fraction=0.0)
    item = tmp_path / 'item.json'
    item.write_text(json.dumps([json.loads(GOOD), {'prompt': 'p2', 'chosen': 'c'}]))
    with pytest.raises(DataError, match=r'item\.json: item 1: missing field'):
        get_dataset(str(item), 'train', tokenizer, eval_fraction=0.0)
    malformed = tmp_path / 'malformed.json'
    malformed.write_text('[\n' + GOOD + ',\n{"prompt": oops}\n]\n')
    with pytest.raises(DataError) as info:
        get_dataset(str(malformed), 'train', tokenizer, eval_fraction=0.0)
    assert f'{malformed}:3' in str(info.value)
    with pytest.raises(DataError, match='no such data file'):
        get_dataset(str(tmp_path / 'missing.jsonl'), 'train', tokenizer)


def test_unknown_dataset_name_lists_the_valid_ones(tokenizer):
    with pytest.raises(DataError) as info:
        get_dataset('hh-rlhf', 'train', tokenizer)
    message = str(info.value)
    assert "'hh-rlhf'" in message
    for name in ('hh', 'shp', 'se', '.jsonl'):
        assert name in message


def test_hub_dataset_unreachable_fails_fast(tokenizer, tmp_path, monkeypatch):
    from huggingface_hub import constants
    if os.path.isdir(constants.HF_HUB_CACHE) and any('hh-rlhf' in d for d in os.listdir(constants.HF_HUB_CACHE)):
        pytest.skip(f'a local HF cache of hh-rlhf exists in {constants.HF_HUB_CACHE}')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    start = time.monotonic()
    with time_limit(60), pytest.raises(DataError) as info:
        get_dataset('hh', 'train', tokenizer, silent=True, cache_dir=str(tmp_path))
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "'hh'" in message and 'Anthropic/hh-rlhf' in message
    assert 'local file' in message and '.jsonl' in message


# ---------------------------------------------------------------------------------------------
# batch_iterator
# ---------------------------------------------------------------------------------------------

def make_examples(n, sft=False):
    return [Example(f'p{i}', f'c{i}', None if sft else f'r{i}', [10 + i] * (1 + i % 3), [20 + i] * (1 + i % 2),
                    None if sft else [30 + i] * (2 - i % 2)) for i in range(n)]


def run(examples, batch_size, **kwargs):
    with time_limit(5):
        return [[int(p[1:]) for p in b['prompt']] for b in batch_iterator(examples, batch_size, 0, **kwargs)]


def test_batches_are_collated_examples():
    examples = make_examples(7)
    batches = list(batch_iterator(examples, 3, pad_token_id=0, shuffle=True, seed=1, n_epochs=1, drop_last=False))
    for b in batches:
        chunk = [examples[int(p[1:])] for p in b['prompt']]
        check_batch(b, chunk, 0, ('chosen', 'rejected'))
    sft = make_examples(4, sft=True)
    b = next(batch_iterator(sft, 4, pad_token_id=0, n_epochs=1))
    check_batch(b, [sft[int(p[1:])] for p in b['prompt']], 0, ('chosen',))


def test_every_example_once_per_epoch():
    epochs = run(make_examples(12), 4, seed=3, n_epochs=3)
    assert [len(b) for b in epochs] == [4] * 9
    orders = [sum(epochs[3 * k:3 * k + 3], []) for k in range(3)]
    for order in orders:
        assert sorted(order) == list(range(12))
    assert len({tuple(o) for o in orders}) == 3                  # reshuffled each epoch
    # without drop_last the last partial batch is kept, and each example still comes once
    batches = run(make_examples(10), 4, seed=0, n_epochs=1, drop_last=False)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    # with drop_last, 10 examples in batches of 4: two full batches per epoch, no repeats inside an epoch
    batches = run(make_examples(10), 4, seed=0, n_epochs=2)
    assert [len(b) for b in batches] == [4] * 4
    for k in (0, 2):
        assert len(set(batches[k] + batches[k + 1])) == 8


def test_shuffling_is_deterministic_per_seed():
    examples = make_examples(20)
    a = run(examples, 5, seed=7, n_epochs=2)
    assert a == run(examples, 5, seed=7, n_epochs=2)
    assert a != run(examples, 5, seed=8, n_epochs=2)
    assert sum(run(examples, 5, shuffle=False, n_epochs=1), []) == list(range(20))
    assert sum(a[:4], []) != list(range(20))


def test_n_examples_limit():
    examples = make_examples(10)
    # without drop_last: exactly n_examples, the last batch cut short
    assert [len(b) for b in run(examples, 4, n_examples=7, drop_last=False)] == [4, 3]
    # n_examples across epochs
    batches = run(examples, 4, n_examples=20, drop_last=False, shuffle=False)
    assert sum(batches, []) == list(range(10)) * 2
    batches = run(examples, 4, n_examples=16, seed=2)
    assert [len(b) for b in batches] == [4] * 4
    # whichever of n_epochs and n_examples comes first
    assert len(run(examples, 2, n_examples=100, n_epochs=1)) == 5
    assert len(run(examples, 2, n_examples=4, n_epochs=3)) == 2
    # drop_last with a limit that is not a multiple of batch_size: only full batches, and it ends
    assert [len(b) for b in run(examples, 4, n_examples=7)] == [4]
    assert [len(b) for b in run(examples, 4, n_examples=7, n_epochs=5)] == [4]


def test_too_few_examples():
    with pytest.raises(DataError, match='3 examples'):
        list(batch_iterator(make_examples(3), 4, 0, n_epochs=1))
    assert [len(b['prompt']) for b in batch_iterator(make_examples(3), 4, 0, n_epochs=1, drop_last=False)] == [3]


# ---------------------------------------------------------------------------------------------
# load_examples: the on-disk cache
# ---------------------------------------------------------------------------------------------

def test_load_examples_cache(tokenizer, tmp_path, monkeypatch):
    path = str(tmp_path / 'rows.jsonl')
    shutil.copy(os.path.join(FIXTURES, 'hh_rows.jsonl'), path)
    cache = str(tmp_path / 'cache')
    kwargs = dict(max_length=64, max_prompt_length=32, sft_mode=False, cache_dir=cache, eval_fraction=0.0, silent=True)
    calls = []
    real = pd.get_dataset

    def counting(*args, **kw):
        calls.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(pd, 'get_dataset', counting)
    first = pd.load_examples([path], tokenizer, 'train', **kwargs)
    assert calls == [path] and len(first) == 4   # the fixture's four pairs
    assert len(glob.glob(os.path.join(cache, 'tokenized', '*.safetensors'))) == 1

    def fail(*args, **kw):
        raise AssertionError('get_dataset called: the cache was not used')

    monkeypatch.setattr(pd, 'get_dataset', fail)
    assert pd.load_examples([path], tokenizer, 'train', **kwargs) == first
    for change in (dict(max_length=65), dict(max_prompt_length=31), dict(sft_mode=True), dict(eval_fraction=0.5)):
        with pytest.raises(AssertionError, match='cache was not used'):
            pd.load_examples([path], tokenizer, 'train', **{**kwargs, **change})
    with pytest.raises(AssertionError, match='cache was not used'):
        pd.load_examples([path], tokenizer, 'test', **kwargs)
    # a changed data file is read again
    with open(path, 'a', encoding='utf-8') as f:
        f.write(GOOD + '\n')
    os.utime(path, ns=(time.time_ns() + 10 ** 9, time.time_ns() + 10 ** 9))
    with pytest.raises(AssertionError, match='cache was not used'):
        pd.load_examples([path], tokenizer, 'train', **kwargs)
    monkeypatch.setattr(pd, 'get_dataset', counting)
    assert len(pd.load_examples([path], tokenizer, 'train', **{**kwargs, 'max_length': 65})) == 5
    assert len(glob.glob(os.path.join(cache, 'tokenized', '*.safetensors'))) == 2


def test_hh_split_is_the_same_in_another_process(hh_splits):
    """The held-out slice must not depend on the process (e.g. on Python's salted str hash)."""
    import subprocess
    import sys
    _, test, _ = hh_splits
    code = ('import json, sys, preference_datasets as pd; '
            'print(json.dumps(sorted(pd.get_dataset(sys.argv[1], "test", None, eval_fraction=0.2))))')
    env = {**os.environ, 'PYTHONHASHSEED': '12345'}
    out = subprocess.run([sys.executable, '-c', code, HH_SAMPLE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == sorted(test)
