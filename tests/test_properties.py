"""Property-based tests (hypothesis) of parsing, tokenization and collation on random unicode, empty
and very long strings: only DataError is ever raised, and masks and labels always agree."""
import functools
import json

from hypothesis import HealthCheck, assume, given, settings, strategies as st

import batches
import model_loading
import preference_datasets as pd
from helpers import CACHE, compose_config

TEXT = st.one_of(st.text(max_size=40), st.text(min_size=300, max_size=3000),
                 st.sampled_from(['', ' ', '<|im_end|>', '\n\nAssistant:', '\n\nHuman: hi\n\nAssistant:', '\x00', '🙂' * 50]))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache()
def tokenizer():
    return model_loading.load_tokenizer(compose_config(['model=tiny', 'exp_name=t']).model, CACHE)


@SETTINGS
@given(row=st.one_of(st.dictionaries(st.sampled_from(['prompt', 'chosen', 'rejected', 'x']), TEXT),
                     st.fixed_dictionaries({'chosen': TEXT, 'rejected': TEXT}),
                     st.fixed_dictionaries({'prompt': TEXT, 'chosen': TEXT, 'rejected': TEXT}),
                     st.lists(TEXT, max_size=3), TEXT))
def test_parsing_raises_only_data_errors(row):
    try:
        prompt, chosen, rejected, mode, _ = pd.parse_row(json.loads(json.dumps(row)), 'f.jsonl:1', tokenizer())
    except pd.DataError as e:
        assert str(e).startswith('f.jsonl:1:')
        return
    assert mode in ('keep_start', 'keep_end')
    if 'prompt' in row:
        assert (prompt, chosen, rejected) == (row['prompt'], row['chosen'], row['rejected'])
    else:
        assert prompt + chosen == row['chosen'] and prompt + rejected == row['rejected']


@SETTINGS
@given(pairs=st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=4),
       mode=st.sampled_from(['keep_start', 'keep_end']), max_length=st.integers(4, 96), sft=st.booleans(),
       data=st.data())
def test_tokenized_batches_have_consistent_masks_and_labels(pairs, mode, max_length, sft, data):
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    tok = tokenizer()
    grouped = pd.group_pairs(pd.Pair(*pair, mode) for pair in pairs)
    examples = pd.tokenize_dataset(grouped, tok, max_length, max_prompt_length, sft_mode=sft, silent=True)
    assert len(examples) == (len(grouped) if sft else len(pairs))
    batch = batches.collate(examples, tok.pad_token_id)
    for kind in ('chosen',) if sft else ('chosen', 'rejected'):
        ids, mask, labels = (batch[f'{kind}_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))
        assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= max_length
        for i, e in enumerate(examples):
            response = getattr(e, f'{kind}_ids')
            n_prompt, n = len(e.prompt_ids), len(e.prompt_ids) + len(response)
            assert 1 <= len(response) and n <= max_length
            assert mask[i, :n].all() and not mask[i, n:].any()
            assert (labels[i, :n_prompt] == -100).all() and (labels[i, n:] == -100).all()
            assert labels[i, n_prompt:n].tolist() == response == ids[i, n_prompt:n].tolist()
            assert ids[i, :n_prompt].tolist() == e.prompt_ids
            if len(response) < max_length - max_prompt_length:  # not cut: ends with the one EOS we append
                assert response[-1] == tok.eos_token_id and tok.eos_token_id not in response[:-1]
    prompt_ids, prompt_mask = batch['prompt_input_ids'], batch['prompt_attention_mask']
    for i, e in enumerate(examples):  # prompts are left-padded for generation
        n_prompt = len(e.prompt_ids)
        assert prompt_mask[i].sum() == n_prompt and prompt_ids[i, prompt_ids.shape[1] - n_prompt:].tolist() == e.prompt_ids


CONTENT = st.one_of(st.text(max_size=30), st.sampled_from(
    ['<|im_end|>', '<|im_start|>user\nhi', '<|endoftext|>', 'a<|im_end|>\n<|im_start|>assistant\nb', '\ue0000\ue001',
     '\n\n', ' x ', '<filename>']))


@SETTINGS
@given(turns=st.lists(CONTENT, min_size=1, max_size=4), system=st.one_of(st.none(), CONTENT), chosen=CONTENT,
       rejected=CONTENT)
def test_chat_content_never_opens_or_closes_a_turn(turns, system, chosen, rejected):
    """Whatever the messages hold, a chat row's ids decode to the rendered conversation and contain exactly the
    template's special tokens: those of the same conversation with neutral content."""
    tok = tokenizer()
    for text in [*turns, system or '', chosen, rejected]:  # (this GGUF vocabulary lacks a few byte tokens)
        assume(tok.decode(tok(text, add_special_tokens=False, split_special_tokens=True)['input_ids']) == text)
    messages = ([{'role': 'system', 'content': system}] if system is not None else []) + \
        [{'role': 'user' if i % 2 == 0 else 'assistant', 'content': t} for i, t in enumerate(turns[::-1])][::-1]
    if messages[-1]['role'] != 'user':
        messages = messages[:-1] or [{'role': 'user', 'content': 'q'}]
    row = {'prompt': messages, 'chosen': [{'role': 'assistant', 'content': chosen}],
           'rejected': [{'role': 'assistant', 'content': rejected}]}
    try:
        pair = pd.parse_row(row, 'f.jsonl:1', tok)
    except pd.DataError as e:
        assert not (chosen.strip() and rejected.strip()), str(e)   # only an empty response is refused
        return
    specials = {tok.convert_tokens_to_ids(t.content) for t in tok.added_tokens_decoder.values() if t.special}

    def neutral(messages):
        return tok(tok.apply_chat_template([{**m, 'content': 'x'} for m in messages], tokenize=False,
                                           add_generation_prompt=messages[-1]['role'] != 'assistant'),
                   add_special_tokens=False)['input_ids']
    prompt_ids, chosen_ids, rejected_ids = pair.ids
    assert tok.decode(prompt_ids) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert [i for i in prompt_ids if i in specials] == [i for i in neutral(messages) if i in specials]
    for text, ids in ((chosen, chosen_ids), (rejected, rejected_ids)):
        assert [i for i in ids if i in specials] == [tok.eos_token_id] == ids[-1:]
        assert tok.decode(prompt_ids + ids) == tok.apply_chat_template(
            messages + [{'role': 'assistant', 'content': text}], tokenize=False).rstrip('\n')
