"""Users' own preference data: chat rows tokenized exactly as the chat template gives them at
inference (SmolLM2's template and a second Jinja template), TRL's five preference formats, every file type,
hub ids (local parquet/arrow files standing in for the hub), the reference data sets' parsing; and every bad
row or file as one DataError naming the file and line. Expected token ids come from the tokenizer
and its chat template (`apply_chat_template(tokenize=True)`, `tokenizer(text)`), never from the code under test."""
import copy
import gzip
import json
import os
import shutil

import pytest

import data_sources
import model_loading
import preference_datasets as pd
from helpers import CACHE, HH_SAMPLE, compose_config
from preference_datasets import DataError, get_dataset, tokenize_dataset


@pytest.fixture(scope='module')
def tokenizer():
    return model_loading.load_tokenizer(compose_config(['model=tiny', 'exp_name=t']).model, CACHE)


# A Zephyr-style template with its own special tokens (added to a copy of the SmolLM2 tokenizer): a different
# turn structure, and an end-of-turn token that is not the tokenizer's EOS.
ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope='module')
def zephyr(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_special_tokens({'additional_special_tokens': ['<|system|>', '<|user|>', '<|assistant|>', '<|end|>']})
    other.chat_template = ZEPHYR
    return other


def inference_ids(tok, messages, generation_prompt):
    """What generation feeds the model: the template applied and tokenized by transformers itself."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out['input_ids'] if isinstance(out, dict) or hasattr(out, 'keys') else out)


def special_ids(tok):
    return {tok.convert_tokens_to_ids(t.content) for t in tok.added_tokens_decoder.values() if t.special}


def write_jsonl(path, rows):
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return str(path)


def examples_of(path, tok, **kwargs):
    data = get_dataset(str(path), 'train', tok, eval_fraction=0.0, **kwargs)
    return sorted(((e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in
                   tokenize_dataset(data, tok, 100_000, 50_000, sft_mode=False, silent=True)))


SYSTEM = {'role': 'system', 'content': 'You are a film critic.'}
USER = {'role': 'user', 'content': 'Write a short review of the movie "Blue Hour", a musical.'}
CONVERSATIONS = [
    [SYSTEM, USER],                                                            # the demo's prompts
    [USER],                                                                    # the template adds its system turn
    [SYSTEM, {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}, USER],   # multi-turn
]


# ---------------------------------------------------------------------------------------------
# 1. Chat rows: token ids as at inference; message content is text
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('template', ['smollm2', 'zephyr'])
@pytest.mark.parametrize('conversation', range(len(CONVERSATIONS)))
def test_chat_rows_tokenize_as_the_template_gives_them_at_inference(tokenizer, zephyr, template, conversation):
    tok = tokenizer if template == 'smollm2' else zephyr
    prompt = CONVERSATIONS[conversation]
    chosen, rejected = [{'role': 'assistant', 'content': 'A lovely, warm film.'}], [{'role': 'assistant', 'content': 'Dull.'}]
    pair = pd.parse_row({'prompt': prompt, 'chosen': chosen, 'rejected': rejected}, 'f.jsonl:1', tok)
    prompt_ids, chosen_ids, rejected_ids = pair.ids
    expected_prompt = inference_ids(tok, prompt, True)
    assert prompt_ids == expected_prompt
    assert prompt_ids == tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)['input_ids']
    end_of_turn = tok.convert_tokens_to_ids('<|im_end|>' if template == 'smollm2' else '<|end|>')
    for response, ids in ((chosen, chosen_ids), (rejected, rejected_ids)):
        whole = inference_ids(tok, prompt + response, False)
        # the whole conversation's ids, through the response's end-of-turn token (not the newline after it)
        cut = len(whole) - whole[::-1].index(end_of_turn)
        assert expected_prompt + ids == whole[:cut]
        assert ids[-1] == end_of_turn and ids.count(end_of_turn) == 1          # no doubled EOS
        assert tok.eos_token_id not in ids[:-1]
    assert pair.chosen == 'A lovely, warm film.' and pair.truncation_mode == 'keep_end'
    # the old rendering (template text tokenized with special tokens split) is what the bug trained on
    split = tok(pair.prompt, add_special_tokens=False, split_special_tokens=True)['input_ids']
    assert len(split) > len(prompt_ids)


def test_demo_prompt_is_23_tokens_not_51(tokenizer):
    pair = pd.parse_row({'prompt': [SYSTEM, {'role': 'user', 'content': 'Review "Blue Hour".'}], 'chosen': 'Good.',
                         'rejected': 'Bad.'}, 'f.jsonl:1', tokenizer)
    assert pair.ids[0] == inference_ids(tokenizer, [SYSTEM, {'role': 'user', 'content': 'Review "Blue Hour".'}], True)
    # text responses of a chat prompt are the assistant's message: its content, then the end-of-turn token
    assert pair.ids[1] == tokenizer('Good.', add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id]


@pytest.mark.parametrize('template', ['smollm2', 'zephyr'])
def test_special_token_text_in_a_message_stays_text(tokenizer, zephyr, template):
    tok = tokenizer if template == 'smollm2' else zephyr
    literal = '<|im_end|>' if template == 'smollm2' else '<|end|>'
    content = f'Is {literal} a token? <|im_start|>user\nno {literal}'
    neutral = [SYSTEM, {'role': 'user', 'content': 'x'}]
    prompt = [SYSTEM, {'role': 'user', 'content': content}]
    pair = pd.parse_row({'prompt': prompt, 'chosen': [{'role': 'assistant', 'content': f'It is {literal}.'}],
                         'rejected': [{'role': 'assistant', 'content': 'No.'}]}, 'f.jsonl:1', tok)
    prompt_ids, chosen_ids, _ = pair.ids
    specials = special_ids(tok)
    # exactly the template's special tokens, as for a message without special-token text: none opens or closes a turn
    assert [i for i in prompt_ids if i in specials] == [i for i in inference_ids(tok, neutral, True) if i in specials]
    assert [i for i in chosen_ids if i in specials] == [chosen_ids[-1]]
    # the content is there as text, tokenized as plain text
    text_ids = tok(content, add_special_tokens=False, split_special_tokens=True)['input_ids']
    assert any(prompt_ids[k:k + len(text_ids)] == text_ids for k in range(len(prompt_ids)))
    # and decoding gives back the rendered conversation
    assert tok.decode(prompt_ids) == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == pair.prompt
    assert pair.chosen == f'It is {literal}.'


def test_response_starting_with_newlines(tokenizer):
    """Where the template's last prompt token and the response's first merge differently ('\\n' + '\\n\\n'),
    the response is the continuation tokenized on its own: prompt ids, then the response's text ids."""
    pair = pd.parse_row({'prompt': [USER], 'chosen': '\n\nGreat.', 'rejected': 'Bad.'}, 'f.jsonl:1', tokenizer)
    assert pair.ids[0] == inference_ids(tokenizer, [USER], True)
    assert pair.ids[1] == tokenizer('\n\nGreat.', add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id]


def test_truncated_chat_prompt_keeps_its_end(tokenizer, tmp_path):
    long_user = {'role': 'user', 'content': 'Tell me about films. ' * 40}
    path = write_jsonl(tmp_path / 'chat.jsonl', [{'prompt': [SYSTEM, long_user], 'chosen': 'Sure.', 'rejected': 'No.'}])
    data = get_dataset(path, 'train', tokenizer, eval_fraction=0.0)
    [example] = tokenize_dataset(data, tokenizer, 48, 32, sft_mode=False, silent=True)
    full = inference_ids(tokenizer, [SYSTEM, long_user], True)
    assert len(full) > 48 and example.prompt_ids == full[-32:]
    assert tokenizer.decode(example.prompt_ids).endswith('<|im_end|>\n<|im_start|>assistant\n')


def test_plain_text_rows_keep_special_token_text_as_text(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / 'text.jsonl', [{'prompt': 'Say <|im_start|>:', 'chosen': ' <|im_end|>', 'rejected': ' no'}])
    [(prompt_ids, chosen_ids, _)] = examples_of(path, tokenizer)
    assert prompt_ids == tokenizer('Say <|im_start|>:', add_special_tokens=False, split_special_tokens=True)['input_ids']
    assert chosen_ids == tokenizer(' <|im_end|>', add_special_tokens=False, split_special_tokens=True)['input_ids'] + [2]
    assert special_ids(tokenizer).isdisjoint(prompt_ids) and special_ids(tokenizer).isdisjoint(chosen_ids[:-1])


# ---------------------------------------------------------------------------------------------
# 2. TRL's preference formats
# ---------------------------------------------------------------------------------------------

PAIRS = [  # (prompt messages, chosen reply, rejected reply)
    ([SYSTEM, USER], 'A warm, funny musical.', 'Dull and long.'),
    ([{'role': 'user', 'content': 'Name a color.'}], 'Blue.', 'I cannot answer that.'),
    ([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': '2+2?'}],
     '4', '5'),
]


def conversational_rows():
    explicit, implicit = [], []
    for prompt, chosen, rejected in PAIRS:
        c, r = [{'role': 'assistant', 'content': chosen}], [{'role': 'assistant', 'content': rejected}]
        explicit.append({'prompt': prompt, 'chosen': c, 'rejected': r})
        implicit.append({'chosen': prompt + c, 'rejected': prompt + r})
    return explicit, implicit


def test_conversational_explicit_and_implicit_give_identical_ids(tokenizer, zephyr, tmp_path):
    explicit, implicit = conversational_rows()
    for tok in (tokenizer, zephyr):
        a = examples_of(write_jsonl(tmp_path / 'explicit.jsonl', explicit), tok)
        b = examples_of(write_jsonl(tmp_path / 'implicit.jsonl', implicit), tok)
        assert a == b and len(a) == 3
        expected = sorted(inference_ids(tok, p, True) for p, _, _ in PAIRS)
        assert sorted(x[0] for x in a) == expected


def test_text_prompt_with_message_list_responses(tokenizer, tmp_path):
    """ultrafeedback_binarized's layout: a text prompt, and chosen/rejected whole conversations (the prompt is
    their shared leading messages, as TRL reads it); or, when they share none, replies to the text prompt."""
    explicit, _ = conversational_rows()
    single = [r for r in explicit if len(r['prompt']) == 1]
    whole = [{'prompt': r['prompt'][0]['content'], 'chosen': r['prompt'] + r['chosen'], 'rejected': r['prompt'] + r['rejected']}
             for r in single]
    replies = [{'prompt': r['prompt'][0]['content'], 'chosen': r['chosen'], 'rejected': r['rejected']} for r in single]
    a = examples_of(write_jsonl(tmp_path / 'explicit.jsonl', single), tokenizer)
    assert examples_of(write_jsonl(tmp_path / 'whole.jsonl', whole), tokenizer) == a
    assert examples_of(write_jsonl(tmp_path / 'replies.jsonl', replies), tokenizer) == a


def test_standard_explicit_and_implicit_give_identical_ids(tokenizer, tmp_path):
    explicit = [{'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'},
                {'prompt': 'Translate to French: the cat ->', 'chosen': ' le chat', 'rejected': ' un chien'}]
    implicit = [{'chosen': r['prompt'] + r['chosen'], 'rejected': r['prompt'] + r['rejected']} for r in explicit]
    a = examples_of(write_jsonl(tmp_path / 'explicit.jsonl', explicit), tokenizer)
    assert a == examples_of(write_jsonl(tmp_path / 'implicit.jsonl', implicit), tokenizer)
    # TRL's rule: the shared start, without the space before the first difference
    data = get_dataset(str(tmp_path / 'implicit.jsonl'), 'train', tokenizer, eval_fraction=0.0)
    assert data['The sky is']['responses'] == [' blue.', ' green.'] and data['The sky is']['truncation_mode'] == 'keep_start'
    assert tokenizer('The sky is', add_special_tokens=False)['input_ids'] in [x[0] for x in a]
    # (responses that start alike lose their shared start to the prompt: the rule's limit, as in TRL)
    same_start = get_dataset(write_jsonl(tmp_path / 'alike.jsonl', [{'chosen': 'cat -> chat', 'rejected': 'cat -> chien'}]),
                             'train', tokenizer, eval_fraction=0.0)
    assert list(same_start) == ['cat -> ch']


def test_standard_implicit_hh_dialogues_keep_the_reference_rule(tokenizer, tmp_path):
    rows = [{'chosen': '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye now', 'rejected':
             '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Go'}]
    data = get_dataset(write_jsonl(tmp_path / 'hh.jsonl', rows), 'train', tokenizer, eval_fraction=0.0)
    prompt = '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:'   # through the LAST Assistant turn
    assert list(data) == [prompt] and data[prompt]['responses'] == [' Bye now', ' Go']
    assert data[prompt]['truncation_mode'] == 'keep_end'


# ---------------------------------------------------------------------------------------------
# 3. File types, hub ids, column names
# ---------------------------------------------------------------------------------------------

def write_all_kinds(rows, directory):
    """The same rows as .jsonl, .jsonl.gz, .json, .parquet and two save_to_disk directories."""
    import datasets
    os.makedirs(directory, exist_ok=True)
    paths = {'jsonl': write_jsonl(os.path.join(directory, 'rows.jsonl'), rows)}
    paths['jsonl.gz'] = os.path.join(directory, 'rows.jsonl.gz')
    with open(paths['jsonl'], 'rb') as f, gzip.open(paths['jsonl.gz'], 'wb') as g:
        g.write(f.read())
    paths['json'] = os.path.join(directory, 'rows.json')
    with open(paths['json'], 'w', encoding='utf-8') as f:
        json.dump(rows, f)
    dataset = datasets.Dataset.from_list(rows)
    paths['parquet'] = os.path.join(directory, 'rows.parquet')
    dataset.to_parquet(paths['parquet'])
    paths['save_to_disk'] = os.path.join(directory, 'saved')
    dataset.save_to_disk(paths['save_to_disk'])
    datasets.DatasetDict({'train_prefs': dataset, 'test_prefs': dataset.select([0])}).save_to_disk(os.path.join(directory, 'dict'))
    paths['save_to_disk:split'] = os.path.join(directory, 'dict') + ':train_prefs'
    return paths


@pytest.mark.parametrize('form', ['standard', 'conversational'])
def test_every_file_type_reads_the_same(tokenizer, tmp_path, form):
    explicit, implicit = conversational_rows()
    rows = explicit if form == 'conversational' else [
        {'prompt': p[-1]['content'], 'chosen': ' ' + c, 'rejected': ' ' + r} for p, c, r in PAIRS]
    paths = write_all_kinds(rows, tmp_path)
    expected = get_dataset(paths['jsonl'], 'train', tokenizer, eval_fraction=0.0)
    assert len(expected) == 3
    for kind, path in paths.items():
        assert get_dataset(path, 'train', tokenizer, eval_fraction=0.0) == expected, kind


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """datasets.load_dataset on hub ids reads local repositories laid out as on the hub (data/SPLIT-*.parquet)."""
    import datasets
    real = datasets.load_dataset
    repos = {}

    def load_dataset(path, *args, **kwargs):
        if path in repos:
            return real(repos[path], *args, **kwargs)
        raise FileNotFoundError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, 'load_dataset', load_dataset)

    def add(repo_id, splits):
        root = tmp_path / 'hub' / repo_id.replace('/', '__')
        for split, rows in splits.items():
            os.makedirs(root / 'data', exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(root / 'data' / f'{split}-00000-of-00001.parquet'))
        repos[repo_id] = str(root)
    return add


def test_hub_ids_with_splits_and_column_names(tokenizer, tmp_path, fake_hub):
    _, implicit = conversational_rows()
    ultrafeedback = [{'prompt': r['chosen'][-2]['content'], 'prompt_id': str(i), **r, 'score_chosen': 8.0}
                     for i, r in enumerate(implicit)]
    fake_hub('HuggingFaceH4/ultrafeedback_binarized', {'train_prefs': ultrafeedback, 'test_prefs': ultrafeedback[:1]})
    cache = str(tmp_path / 'hf')
    data = get_dataset('HuggingFaceH4/ultrafeedback_binarized:train_prefs', 'train', tokenizer, eval_fraction=0.0, cache_dir=cache)
    local = get_dataset(write_jsonl(tmp_path / 'implicit.jsonl', implicit), 'train', tokenizer, eval_fraction=0.0)
    assert data == local
    assert len(get_dataset('HuggingFaceH4/ultrafeedback_binarized:test_prefs', 'test', tokenizer, eval_fraction=1.0,
                           cache_dir=cache)) == 1
    # other column names, through the config's data_columns; no ':split' means 'train'
    renamed = [{'question': 'Name a color.', 'good': 'Blue.', 'bad': 'No.'}]
    fake_hub('someone/colors', {'train': renamed})
    columns = {'prompt': 'question', 'chosen': 'good', 'rejected': 'bad'}
    data = get_dataset('someone/colors', 'train', tokenizer, eval_fraction=0.0, cache_dir=cache, columns=columns)
    assert data == {'Name a color.': {'responses': ['Blue.', 'No.'], 'pairs': [(0, 1)], 'sft_target': 'Blue.',
                                      'truncation_mode': 'keep_start'}}
    with pytest.raises(DataError, match=r"someone/colors row 0: missing field 'chosen'"):
        get_dataset('someone/colors', 'train', tokenizer, eval_fraction=0.0, cache_dir=cache)


def test_hub_id_offline_fails_at_once_with_the_clear_message(tokenizer, tmp_path, monkeypatch):
    import time
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        get_dataset('HuggingFaceH4/ultrafeedback_binarized:train_prefs', 'train', tokenizer, cache_dir=str(tmp_path))
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "'HuggingFaceH4/ultrafeedback_binarized:train_prefs'" in message and 'local file' in message
    assert 'save_to_disk' in message


def test_names_are_told_apart(tmp_path):
    existing = tmp_path / 'd'
    existing.mkdir()
    assert data_sources.resolve('hh') == ('reference', 'hh', None)
    assert data_sources.resolve('HuggingFaceH4/ultrafeedback_binarized:train_prefs') == \
        ('hub', 'HuggingFaceH4/ultrafeedback_binarized', 'train_prefs')
    assert data_sources.resolve('owner/name') == ('hub', 'owner/name', 'train')
    assert data_sources.resolve(str(existing)) == ('disk', str(existing), None)
    assert data_sources.resolve(f'{existing}:test') == ('disk', str(existing), 'test')
    assert data_sources.resolve('missing.jsonl')[0] == 'file'
    assert data_sources.resolve('./data/pairs.txt')[0] == 'file'          # a path, not a hub id
    with pytest.raises(DataError, match="unknown dataset 'hh-rlhf'"):
        data_sources.resolve('hh-rlhf')


def test_reference_hub_loaders_parse_as_the_reference(tokenizer, monkeypatch):
    """hh, shp and se read through datasets.load_dataset exactly as the reference parses them."""
    import datasets
    if not os.path.exists(HH_SAMPLE):
        pytest.skip(f'real hh-rlhf sample not found at {os.path.normpath(HH_SAMPLE)}')
    with gzip.open(HH_SAMPLE, 'rt', encoding='utf-8') as f:
        hh = [json.loads(line) for line in f][:300]
    shp = [{'history': 'Why?', 'human_ref_A': 'Because.', 'human_ref_B': 'No idea.', 'score_A': 10, 'score_B': 2, 'labels': 1},
           {'history': 'Why?', 'human_ref_A': 'Hm.', 'human_ref_B': 'Since.', 'score_A': 3, 'score_B': 9, 'labels': 0},
           {'history': 'How?', 'human_ref_A': 'So.', 'human_ref_B': 'Thus.', 'score_A': 3, 'score_B': 4, 'labels': 0}]
    se = [{'question': '<p>Q?</p>', 'answers': [{'text': '<p>a</p>', 'pm_score': 1}, {'text': '<p>b</p><pre><code>x</code></pre>', 'pm_score': 3}]}] * 100
    tables = {'Anthropic/hh-rlhf': datasets.Dataset.from_list(hh), 'stanfordnlp/SHP': datasets.Dataset.from_list(shp),
              'HuggingFaceH4/stack-exchange-preferences': datasets.DatasetDict({'train': datasets.Dataset.from_list(se)})}
    monkeypatch.setattr(datasets, 'load_dataset', lambda path, cache_dir=None, split=None: tables[path])
    data = get_dataset('hh', 'train', silent=True)
    for row in hh:   # the reference: prompt through chosen's last Assistant turn (where rejected shares it)
        prompt = row['chosen'][:row['chosen'].rfind('\n\nAssistant:') + len('\n\nAssistant:')]
        if row['rejected'].startswith(prompt):
            assert row['chosen'][len(prompt):] in data[prompt]['responses']
    assert get_dataset('shp', 'train', silent=True) == {'\n\nHuman: Why?\n\nAssistant:': {
        'responses': [' Because.', ' No idea.', ' Hm.', ' Since.'], 'pairs': [(0, 1), (3, 2)],
        'truncation_mode': 'keep_start', 'sft_target': ' Because.'}}
    [(prompt, entry)] = get_dataset('se', 'train', silent=True).items()
    assert prompt == '\n\nHuman: Q?\n\nAssistant:' and entry['responses'] == [' a', ' b\n\n<code>x</code>']
    assert entry['pairs'] == [(1, 0)] and entry['sft_target'] == ' b\n\n<code>x</code>'


# ---------------------------------------------------------------------------------------------
# Bad rows and files: one DataError naming the file and line
# ---------------------------------------------------------------------------------------------

GOOD = {'prompt': 'p', 'chosen': 'c', 'rejected': 'r'}
BAD_ROWS = {
    'prompt null': (b'{"prompt": null, "chosen": "c", "rejected": "r"}', "'prompt' must be text or a list of chat messages, got null"),
    'prompt number': (b'{"prompt": 3, "chosen": "c", "rejected": "r"}', 'got a number'),
    'prompt object': (b'{"prompt": {"text": "p"}, "chosen": "c", "rejected": "r"}', 'got an object'),
    'chat prompt of strings': (b'{"prompt": ["hi", "there"], "chosen": "c", "rejected": "r"}',
                               "'prompt' is a list but item 0 is not a chat message"),
    'invalid UTF-8': (b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}', 'invalid UTF-8 (byte 0xe9'),
    'lone surrogate': (b'{"prompt": "p \\ud83d", "chosen": "c", "rejected": "r"}', 'lone surrogate'),
    'mixed responses': (b'{"prompt": [{"role": "user", "content": "q"}], "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]}',
                        'must both be text or both lists of chat messages'),
    'message without role': (b'{"prompt": [{"content": "q"}], "chosen": "c", "rejected": "r"}', 'is not a chat message'),
    'prompt ends with the assistant': (b'{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
                                       b'"chosen": "c", "rejected": "r"}', 'ends with an assistant message'),
    'implicit without a shared prompt': (b'{"chosen": "yes", "rejected": "no"}', 'share no prompt'),
}


@pytest.mark.parametrize('case', BAD_ROWS)
def test_bad_rows_name_file_and_line_and_can_be_skipped(tokenizer, tmp_path, case, capsys):
    line, words = BAD_ROWS[case]
    path = tmp_path / 'bad.jsonl'
    path.write_bytes(json.dumps(GOOD).encode() + b'\n\n' + line + b'\n' + json.dumps({**GOOD, 'prompt': 'q'}).encode() + b'\n')
    with pytest.raises(DataError) as info:
        get_dataset(str(path), 'train', tokenizer, eval_fraction=0.0)
    assert str(info.value).startswith(f'{path}:3: ') and words in str(info.value), str(info.value)
    assert '\n' not in str(info.value)
    data = get_dataset(str(path), 'train', tokenizer, eval_fraction=0.0, on_bad_example='skip')
    assert sorted(data) == ['p', 'q']
    assert f'skipped 1 bad rows of {path} (on_bad_example=skip); first: {path}:3: ' in capsys.readouterr().out


def test_bad_files_name_the_file(tokenizer, tmp_path):
    good = write_jsonl(tmp_path / 'good.jsonl', [GOOD] * 50 + [{**GOOD, 'prompt': f'p{i}'} for i in range(2000)])
    truncated = tmp_path / 'truncated.jsonl.gz'
    with open(good, 'rb') as f:
        whole = gzip.compress(f.read())
    truncated.write_bytes(whole[:len(whole) // 2])
    plain = tmp_path / 'plain.jsonl.gz'
    shutil.copy(good, plain)
    directory = tmp_path / 'pairs.jsonl'
    directory.mkdir()
    not_parquet = tmp_path / 'rows.parquet'
    shutil.copy(good, not_parquet)
    bad_json = tmp_path / 'rows.json'
    bad_json.write_bytes(b'[\n{"prompt": "p", "chosen": "c", "rejected": "r"},\n{"prompt": "\xff"}\n]')
    cases = [(truncated, fr'^{truncated}: truncated or corrupt gzip file: it ends after line \d+ '),
             (plain, f'^{plain}: not a gzip file, although its name ends in .gz'),
             (directory, f"^{directory}: a directory, not a data file, and not one written by datasets' save_to_disk"),
             (not_parquet, f'^{not_parquet}: not a readable Parquet file'),
             (bad_json, f'^{bad_json}:3: invalid UTF-8'),
             (tmp_path / 'missing.jsonl', f'^{tmp_path}/missing.jsonl: no such data file'),
             (tmp_path / 'rows.txt', f'^{tmp_path}/rows.txt: no such data file')]
    for path, pattern in cases:
        for skip in ('error', 'skip'):  # a bad file is never skipped
            with pytest.raises(DataError, match=pattern):
                get_dataset(str(path), 'train', tokenizer, eval_fraction=0.0, on_bad_example=skip)


def test_identical_chosen_and_rejected_are_counted_and_reported(tokenizer, tmp_path, capsys):
    same_chat = {'prompt': [{'role': 'user', 'content': 'q'}], 'chosen': 'same', 'rejected': 'same'}
    path = write_jsonl(tmp_path / 'same.jsonl', [GOOD, {**GOOD, 'rejected': 'c'}, same_chat, {**GOOD, 'prompt': 'x'}])
    data = get_dataset(path, 'train', tokenizer, eval_fraction=0.0)
    assert sum(len(e['pairs']) for e in data.values()) == 4        # kept
    out = capsys.readouterr().out
    assert (f'warning: {path}: 2 of 4 pairs have identical chosen and rejected responses (no preference signal; kept); '
            f'first: {path}:2') in out


# ---------------------------------------------------------------------------------------------
# 4. The inspection command, and train.py on the new formats
# ---------------------------------------------------------------------------------------------

def run(args, cwd=None):
    import subprocess
    import sys
    from helpers import ROOT
    proc = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return proc.returncode, proc.stdout, proc.stderr


def test_inspection_command_shows_and_writes_what_training_uses(tokenizer, tmp_path):
    import re
    from helpers import make_trainer
    _, implicit = conversational_rows()
    rows = [{'chosen': r['chosen'][:-1] + [{'role': 'assistant', 'content': f'{r["chosen"][-1]["content"]} ({i})'}],
             'rejected': r['rejected']} for i, r in enumerate(implicit * 4)]
    import datasets
    path = str(tmp_path / 'pairs.parquet')
    datasets.Dataset.from_list(rows).to_parquet(path)
    overrides = ['model=tiny', 'loss=tdpo', f'datasets=[{path}]', f'local_dirs=[{CACHE}]', 'max_length=64',
                 'max_prompt_length=32', 'eval_fraction=0.25']
    out_json = str(tmp_path / 'out.jsonl')
    code, out, err = run(['preference_datasets.py', '--n', '2', '--json', out_json, '--', *overrides])
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in open(out_json)]
    n = int(re.search(r'^(\d+) train examples \(pairs\)', out, re.M).group(1))
    assert n == len(records) and 0 < n < 12      # eval_fraction held some prompts out
    assert {'prompt_input_ids', 'chosen_input_ids', 'chosen_labels', 'rejected_input_ids', 'rejected_labels'} <= set(records[0])
    by_prompt = {p[-1]['content']: p for p, _, _ in PAIRS}
    for r in records:
        prompt = r['prompt_input_ids']
        for kind in ('chosen', 'rejected'):
            response = r[f'{kind}_input_ids'][len(prompt):]
            assert r[f'{kind}_input_ids'] == prompt + response and r[f'{kind}_labels'] == [-100] * len(prompt) + response
            assert response[-1] == tokenizer.eos_token_id and len(prompt) + len(response) <= 64
        user = next(c for c in by_prompt if c in r['prompt'])
        full = inference_ids(tokenizer, by_prompt[user], True)
        assert prompt in (full, full[-32:])   # keep_end truncation where the pair is too long
    # the printout: the prompt marked as masked, token counts of what is trained
    for i, r in enumerate(records[:2]):
        assert (f'train example {i + 1} of {n}: prompt {len(r["prompt_input_ids"])} tokens (masked) · chosen '
                f'{len(r["chosen_labels"]) - len(r["prompt_input_ids"])} tokens') in out
    assert out.count('┌─ prompt (masked: labels -100, no loss) ─') == 2
    # exactly the trainer's examples
    trainer = make_trainer(tmp_path / 'trainer', datasets=f'[{path}]', eval_fraction=0.25)
    assert [pd.example_record(e, tokenizer.pad_token_id) for e in trainer.train_examples] == records


@pytest.mark.parametrize('args, line', [
    (['datasets=[{tmp}/missing.jsonl]'], 'data error: {tmp}/missing.jsonl: no such data file'),
    (['datasets=[{tmp}/bad.jsonl]'], "data error: {tmp}/bad.jsonl:2: 'prompt' must be text or a list of chat messages, got null"),
    (['nokey=1'], "config error: Could not override 'nokey'."),
])
def test_inspection_command_errors_are_one_line(tmp_path, args, line):
    write_jsonl(tmp_path / 'bad.jsonl', [GOOD, {**GOOD, 'prompt': None}])
    code, out, err = run(['preference_datasets.py', '--', 'model=tiny', f'local_dirs=[{CACHE}]',
                          *[a.format(tmp=tmp_path) for a in args]])
    assert code == 1 and err.strip().splitlines()[-1].startswith(line.format(tmp=tmp_path)), err
    assert 'Traceback' not in err



def test_a_failed_launch_leaves_no_empty_run_directory(tmp_path):
    """train.py on a bad data file: one data error line, before any model is loaded (build_models prints
    the reference's dtype first), and the run directory this launch created (holding only config.yaml and
    the lock) is gone; a run directory that existed before is kept."""
    write_jsonl(tmp_path / 'bad.jsonl', [GOOD, {**GOOD, 'prompt': None}])
    args = ['-u', 'train.py', 'model=tiny', 'loss=tdpo', 'exp_name=bad', f'local_dirs=[{CACHE}]',
            f'datasets=[{tmp_path}/bad.jsonl]', 'wandb.enabled=false', 'n_examples=8', 'batch_size=4']
    for run_dir, existed in ((tmp_path / 'new_run', False), (tmp_path / 'old_run', True)):
        if existed:
            os.makedirs(run_dir)
        code, out, err = run([*args, f'local_run_dir={run_dir}'])
        assert code == 1 and err.strip().splitlines()[-1].startswith(f'data error: {tmp_path}/bad.jsonl:2: '), err[-2000:]
        assert 'reference model in' not in out, out[-2000:]  # the data was read before the models
        assert os.path.isdir(run_dir) == existed, os.listdir(tmp_path)


def test_train_on_conversational_parquet_with_save_to_disk_eval(tmp_path):
    """train.py end to end on the new formats: conversational implicit rows in parquet for training, a
    save_to_disk DatasetDict split for evaluation."""
    import datasets
    explicit, implicit = conversational_rows()
    train_path = str(tmp_path / 'train.parquet')
    datasets.Dataset.from_list(implicit * 3).to_parquet(train_path)
    datasets.DatasetDict({'test': datasets.Dataset.from_list(explicit)}).save_to_disk(str(tmp_path / 'saved'))
    run_dir = str(tmp_path / 'run')
    code, out, err = run(['-u', 'train.py', 'model=tiny', 'loss=tdpo', 'exp_name=formats', f'local_dirs=[{CACHE}]',
                          f'local_run_dir={run_dir}', f'datasets=[{train_path}]', f'eval_datasets=[{tmp_path}/saved:test]',
                          'batch_size=4', 'eval_batch_size=4', 'n_examples=8', 'max_length=64', 'max_prompt_length=48',
                          'wandb.enabled=false', 'sample_during_eval=false', 'debug=true'])
    assert code == 0, (out + err)[-3000:]
    assert '9 train and 3 eval examples' in out, out[-2000:]   # eval data named: the training file is used whole
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert [m['step'] for m in metrics if m['split'] == 'eval'] == [0, 8]


def test_evaluate_samples_from_the_prompt_ids_training_uses(tokenizer, tmp_path):
    """evaluate.py reads its prompts with training's tokenization: a chat prompt whose user turn holds
    special-token text (which tokenizer(rendered text) would turn into turn markers), a plain-text prompt
    with such text, and an ordinary one all get the ids training gives them."""
    import evaluate
    rows = [{'prompt': [SYSTEM, {'role': 'user', 'content': 'Is <|im_end|> a token? <|im_start|>user\nno'}],
             'chosen': 'Yes.', 'rejected': 'No.'},
            {'prompt': 'Plain <|endoftext|> text:', 'chosen': ' a', 'rejected': ' b'},
            {'prompt': [USER], 'chosen': 'Great.', 'rejected': 'Bad.'}]
    path = write_jsonl(tmp_path / 'prompts.jsonl', rows)
    prompts = evaluate.read_prompts(path, tokenizer, None)
    training = {e.prompt: e.prompt_ids for e in tokenize_dataset(get_dataset(path, 'train', tokenizer, eval_fraction=0.0),
                                                                 tokenizer, 100_000, 50_000, sft_mode=False, silent=True)}
    assert [text for text, _ in prompts] == list(training)  # file order
    assert all(ids == training[text] for text, ids in prompts)
    naive = [tokenizer(text, add_special_tokens=False)['input_ids'] for text, _ in prompts]
    assert [ids != n for (_, ids), n in zip(prompts, naive)] == [True, True, False]  # the case this guards
    assert prompts[2][1] == inference_ids(tokenizer, [USER], True)
