"""Preference data: the reference's hub data sets (hh, shp, se), users' files and hub data sets in TRL's
formats, and tokenization exactly as the model sees the text at inference (once, cached on disk).

A data set becomes `{prompt: {'responses': [str], 'pairs': [(i_chosen, i_rejected)], 'sft_target': str,
'truncation_mode': 'keep_end' | 'keep_start'}}` (chat rows add their token ids: 'prompt_ids' and
'response_ids'), is tokenized once into `Example`s, and `batches.batch_iterator` shuffles and collates them into
the batches the trainers consume. Files and hub ids are read by `data_sources.py`, chat rows tokenized by
`chat_tokens.py`, the tokenized examples cached by `tokenized_cache.py`.

`python preference_datasets.py [--split train|test] [--n N] [--json OUT.jsonl] -- <train.py overrides>`
shows what train.py would train on (see `main`).
"""
import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
from tqdm import tqdm

import batches
import chat_tokens
import data_sources
import model_loading
import tokenized_cache
import utils
from batches import batch_iterator  # noqa: F401  (the old import path preference_datasets.batch_iterator)
from data_sources import DataError, is_local_file  # noqa: F401  (re-exported: callers catch DataError here)

ASSISTANT, HUMAN = '\n\nAssistant:', '\n\nHuman:'
COLUMNS = {'prompt': 'prompt', 'chosen': 'chosen', 'rejected': 'rejected'}  # config.data_columns' defaults
# Bump when parsing or tokenization changes, so stale caches are not reused.
TOKENIZATION_VERSION = 2


def extract_anthropic_prompt(prompt_and_response: str, where: str = '') -> str:
    """Everything through the last '\\n\\nAssistant:' of an HH dialogue."""
    index = prompt_and_response.rfind(ASSISTANT)
    if index == -1:
        raise DataError(f"{where}: dialogue has no {ASSISTANT!r}: {prompt_and_response[:80]!r}")
    return prompt_and_response[:index + len(ASSISTANT)]


def split_hh_row(chosen: str, rejected: str, where: str) -> Tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of an HH row. The prompt is the reference's
    (through chosen's last Assistant turn); in the few real rows whose dialogues part earlier, it is
    the shared text through the last Assistant turn they have in common (the reference would cut
    the rejected dialogue at the wrong place)."""
    prompt = extract_anthropic_prompt(chosen, where)
    if not rejected.startswith(prompt):
        shared = os.path.commonprefix([chosen, rejected])
        if ASSISTANT not in shared:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no dialogue through an {ASSISTANT!r} turn")
        prompt = extract_anthropic_prompt(shared, where)
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


class Pair(NamedTuple):
    """One preference pair as text (what is shown and logged) and, for chat rows, the token ids the chat
    template gives: (prompt ids, chosen ids, rejected ids), responses ending with the end-of-turn token."""
    prompt: str
    chosen: str
    rejected: str
    truncation_mode: str
    ids: Optional[Tuple[List[int], List[int], List[int]]] = None


def group_pairs(pairs: Iterable[Pair]) -> Dict:
    """Pairs -> the reference's per-prompt dict (the last pair's chosen response is the SFT target; the
    first pair of a prompt decides its truncation mode)."""
    data = {}
    for pair in pairs:
        entry = data.setdefault(pair.prompt, {'responses': [], 'pairs': [], 'truncation_mode': pair.truncation_mode})
        n = len(entry['responses'])
        entry['pairs'].append((n, n + 1))
        entry['responses'].extend([pair.chosen, pair.rejected])
        entry['sft_target'] = pair.chosen
        if pair.ids is not None or 'response_ids' in entry:
            entry.setdefault('prompt_ids', pair.ids[0] if pair.ids else None)
            entry.setdefault('response_ids', [None] * n).extend(pair.ids[1:] if pair.ids else [None, None])
    return data


# ---------------------------------------------------------------------------------------------
# Hugging Face hub data sets, parsed exactly as the reference implementation parses them
# ---------------------------------------------------------------------------------------------

def get_hh(split: str, silent: bool = False, cache_dir: Optional[str] = None, on_bad_example: str = 'error',
           report: Callable[[str], None] = print) -> Dict:
    rows = data_sources.load_hub('Anthropic/hh-rlhf', 'hh', cache_dir, split=split)
    parsed, bad = [], BadRows(f'hh {split}', on_bad_example, report)
    for i, r in enumerate(tqdm(rows, desc='Processing HH', disable=silent)):
        try:
            parsed.append(Pair(*split_hh_row(r['chosen'], r['rejected'], f'hh {split} row {i}'), 'keep_end'))
        except DataError as e:
            bad.handle(e)
    bad.report()
    report_identical(parsed, f'hh {split}', report)
    return group_pairs(parsed)


def get_shp(split: str, silent: bool = False, cache_dir: Optional[str] = None, on_bad_example: str = 'error',
            report: Callable[[str], None] = print) -> Dict:
    """Stanford Human Preferences; pairs whose score ratio is below 2 are dropped, as in the reference."""
    rows = data_sources.load_hub('stanfordnlp/SHP', 'shp', cache_dir, split=split)
    data = defaultdict(lambda: {'responses': [], 'pairs': [], 'scores': [], 'truncation_mode': 'keep_start'})
    for row in tqdm(rows, desc='Processing SHP', disable=silent):
        scores = [row['score_A'], row['score_B']]
        if max(scores[0] / scores[1], scores[1] / scores[0]) < 2:
            continue
        entry = data['\n\nHuman: ' + row['history'] + ASSISTANT]
        n = len(entry['responses'])
        entry['pairs'].append((n, n + 1) if row['labels'] == 1 else (n + 1, n))
        entry['responses'].extend([' ' + row['human_ref_A'], ' ' + row['human_ref_B']])
        entry['scores'].extend(scores)
    for entry in data.values():
        entry['sft_target'] = entry['responses'][max(range(len(entry['scores'])), key=entry['scores'].__getitem__)]
        del entry['scores']
    return dict(data)


def strip_html_tags(html: str) -> str:
    """Paragraph text and <code> blocks of a Stack Exchange post, as the reference keeps them."""
    from bs4 import BeautifulSoup, NavigableString
    text = []
    for element in BeautifulSoup(html, 'html.parser').children:
        if isinstance(element, NavigableString):
            continue
        if element.name == 'p':
            text.append(''.join(c.string for c in element.children if isinstance(c, NavigableString)))
        elif element.name == 'pre':
            text.extend('<code>' + code.get_text() + '</code>' for code in element.find_all('code'))
        elif element.name == 'code':
            text.append('<code>' + element.get_text() + '</code>')
    return '\n\n'.join(text)


def get_se(split: str, silent: bool = False, cache_dir: Optional[str] = None, on_bad_example: str = 'error',
           report: Callable[[str], None] = print) -> Dict:
    """Stack Exchange preferences: a seeded 1% of the train split is the test split, as in the reference."""
    rows = data_sources.load_hub('HuggingFaceH4/stack-exchange-preferences', 'se', cache_dir)['train'].shuffle(seed=42)
    n_test = int(len(rows) * 0.01)
    rows = rows.select(range(n_test) if split == 'test' else range(n_test, len(rows)))
    data = {}
    for row in tqdm(rows, desc='Processing SE', disable=silent):
        responses = [' ' + strip_html_tags(a['text']) for a in row['answers']]
        scores = [a['pm_score'] for a in row['answers']]
        pairs = [(i, j) if scores[i] > scores[j] else (j, i)
                 for i in range(len(responses)) for j in range(i + 1, len(responses))]
        data['\n\nHuman: ' + strip_html_tags(row['question']) + ASSISTANT] = {
            'responses': responses, 'pairs': pairs, 'truncation_mode': 'keep_start',
            'sft_target': responses[max(range(len(scores)), key=scores.__getitem__)]}
    return data


# ---------------------------------------------------------------------------------------------
# Rows in TRL's preference formats (and HH dialogues)
# ---------------------------------------------------------------------------------------------

def _chat_pair(tokenizer, prompt: List[Dict], responses: List[List[Dict]], where: str) -> Pair:
    prompt_text, (chosen, rejected), prompt_ids, (chosen_ids, rejected_ids) = chat_tokens.conversation_ids(
        tokenizer, prompt, responses, where)
    return Pair(prompt_text, chosen, rejected, 'keep_end', (prompt_ids, chosen_ids, rejected_ids))


def _kind(value, key: str, where: str) -> str:
    """'text' or 'messages' (a non-empty list of {'role', 'content'} objects with string values)."""
    if isinstance(value, str):
        return 'text'
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)):
                raise DataError(f"{where}: {key!r} is a list but item {i} is not a chat message "
                                f"({{'role': str, 'content': str}}): {json.dumps(m, default=str)[:80]}")
        return 'messages'
    got = ('null' if value is None else 'an empty list' if value == [] else 'a boolean' if isinstance(value, bool)
           else 'a number' if isinstance(value, (int, float)) else 'an object' if isinstance(value, dict)
           else type(value).__name__)
    raise DataError(f"{where}: {key!r} must be text or a list of chat messages, got {got}")


def _check_unicode(value, where: str, key: str = ''):
    """Lone surrogates (JSON '\\ud83d' escapes) are not text: no tokenizer can encode them."""
    if isinstance(value, str):
        try:
            value.encode('utf-8')
        except UnicodeEncodeError as e:
            raise DataError(f'{where}: {key!r} holds an invalid character {value[e.start]!r} (a lone surrogate '
                            f'escape, not valid Unicode) at position {e.start}') from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where, key)
            _check_unicode(v, where, key or k)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, where, key)


def shared_text_prompt(chosen: str, rejected: str, where: str) -> Tuple[str, str, str]:
    """TRL's implicit prompt of two texts: their shared start, ending before the space that precedes
    their first difference."""
    n = len(os.path.commonprefix([chosen, rejected]))
    if n == min(len(chosen), len(rejected)):
        raise DataError(f"{where}: implicit-prompt row: one of 'chosen'/'rejected' is a prefix of the other, so "
                        f"their shared prompt is undefined (give 'prompt' explicitly)")
    if n and chosen[n - 1] == ' ':
        n -= 1
    if not chosen[:n].strip():
        raise DataError(f"{where}: implicit-prompt row: 'chosen' and 'rejected' share no prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def parse_row(row, where: str, tokenizer, columns: Optional[Dict[str, str]] = None) -> Pair:
    """One row -> a Pair, in any of TRL's preference formats:
      standard explicit        {"prompt": str, "chosen": str, "rejected": str}
      standard implicit        {"chosen": str, "rejected": str}: the prompt is their shared start (TRL's rule);
                               HH dialogues ('\\n\\nHuman:' ... '\\n\\nAssistant:') split at the last Assistant turn
      conversational explicit  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                               (text responses are the assistant's message)
      conversational implicit  {"chosen": [messages], "rejected": [messages]}: the prompt is their shared
                               leading messages
      text prompt, message-list responses  {"prompt": str, "chosen": [messages], ...}: as implicit (TRL), the
                               text prompt being the user turn when the lists share no leading message
    Text prompts keep their start when truncated; HH dialogues and chat prompts keep their end."""
    columns = {**COLUMNS, **(columns or {})}
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object, got {type(row).__name__}')
    for key in (columns['chosen'], columns['rejected']):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (have {sorted(row)})")
    _check_unicode(row, where)
    chosen, rejected = row[columns['chosen']], row[columns['rejected']]
    kind = _kind(chosen, columns['chosen'], where)
    if _kind(rejected, columns['rejected'], where) != kind:
        raise DataError(f"{where}: {columns['chosen']!r} and {columns['rejected']!r} must both be text or both "
                        f"lists of chat messages")
    has_prompt = columns['prompt'] in row
    prompt = row.get(columns['prompt'])
    prompt_kind = _kind(prompt, columns['prompt'], where) if has_prompt else None

    if kind == 'messages' and prompt_kind != 'messages':  # implicit: the shared leading messages
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n:
            return _chat_pair(tokenizer, chosen[:n], [chosen[n:], rejected[n:]], where)
        if prompt_kind == 'text':
            return _chat_pair(tokenizer, [{'role': 'user', 'content': prompt}], [chosen, rejected], where)
        raise DataError(f"{where}: implicit-prompt row: 'chosen' and 'rejected' share no leading message")
    if prompt_kind == 'messages':
        if kind == 'text':
            chosen, rejected = ([{'role': 'assistant', 'content': r}] for r in (chosen, rejected))
        return _chat_pair(tokenizer, prompt, [chosen, rejected], where)
    if prompt_kind is None:  # standard implicit
        if any(marker in chosen for marker in (HUMAN, ASSISTANT)):
            return Pair(*split_hh_row(chosen, rejected, where), 'keep_end')
        return Pair(*shared_text_prompt(chosen, rejected, where), 'keep_start')
    for name, text in (('prompt', prompt), ('chosen', chosen), ('rejected', rejected)):
        if not text.strip():
            raise DataError(f'{where}: empty {name}')
    return Pair(prompt, chosen, rejected, 'keep_start')


def is_eval_prompt(prompt: str, eval_fraction: float) -> bool:
    """Deterministic held-out slice of a local file: a stable hash of the prompt, so every pair of a
    prompt lands on the same side and the split never changes between runs or machines."""
    return int.from_bytes(hashlib.md5(prompt.encode('utf-8')).digest()[:8], 'big') < eval_fraction * 2 ** 64


_is_eval_prompt = is_eval_prompt  # the earlier, private name


class BadRows:
    """on_bad_example: 'error' raises the first bad row's DataError; 'skip' counts and reports them."""

    def __init__(self, source: str, on_bad_example: str = 'error', report: Callable[[str], None] = print):
        self.source, self.skip, self.errors, self.print = source, on_bad_example == 'skip', [], report

    def handle(self, error: DataError):
        if not self.skip:
            raise error
        self.errors.append(str(error))

    def report(self):
        if self.errors:
            self.print(f'skipped {len(self.errors)} bad rows of {self.source} (on_bad_example=skip); '
                       f'first: {self.errors[0]}')


def report_identical(pairs: List[Pair], source: str, report: Callable[[str], None], wheres: Optional[List[str]] = None):
    """Pairs whose chosen and rejected responses are identical carry no preference: count and report them."""
    same = [i for i, p in enumerate(pairs) if p.chosen == p.rejected and (p.ids is None or p.ids[1] == p.ids[2])]
    if same:
        first = f'; first: {wheres[same[0]]}' if wheres else ''
        report(f'warning: {source}: {len(same)} of {len(pairs)} pairs have identical chosen and rejected responses '
               f'(no preference signal; kept){first}')


def get_rows(name: str, split: str, tokenizer, eval_fraction: float, on_bad_example: str = 'error',
             columns: Optional[Dict[str, str]] = None, cache_dir: Optional[str] = None, silent: bool = True,
             report: Callable[[str], None] = print) -> Dict:
    """A file, save_to_disk directory or hub id in TRL's formats -> the per-prompt dict of its `split`
    side: the held-out share `eval_fraction` of its prompts (by a stable hash) is 'test', the rest 'train'."""
    pairs, wheres, bad = [], [], BadRows(name, on_bad_example, report)
    for where, row in tqdm(data_sources.read_rows(name, cache_dir), desc=f'Reading {name}', disable=silent):
        try:
            pair = parse_row(row, where, tokenizer, columns)
        except DataError as e:
            bad.handle(e)
            continue
        if (split == 'test') == is_eval_prompt(pair.prompt, eval_fraction):
            pairs.append(pair)
            wheres.append(where)
    bad.report()
    if not pairs:
        raise DataError(f'{name}: no {split} pairs (eval_fraction={eval_fraction})')
    report_identical(pairs, name, report, wheres)
    return group_pairs(pairs)


def get_local(path: str, split: str, tokenizer, eval_fraction: float, on_bad_example: str = 'error', **kwargs) -> Dict:
    """A local file or save_to_disk directory (see get_rows)."""
    return get_rows(path, split, tokenizer, eval_fraction, on_bad_example, **kwargs)


def get_dataset(name: str, split: str, tokenizer=None, silent: bool = False, cache_dir: Optional[str] = None,
                eval_fraction: float = 0.05, on_bad_example: str = 'error', columns: Optional[Dict[str, str]] = None,
                report: Callable[[str], None] = print) -> Dict:
    """hh, shp, se (the reference's parsing and splits), or a local file, directory or hub id (get_rows)."""
    loaders = {'hh': get_hh, 'shp': get_shp, 'se': get_se}
    if name in loaders:
        return loaders[name](split, silent=silent, cache_dir=cache_dir, on_bad_example=on_bad_example, report=report)
    return get_rows(name, split, tokenizer, eval_fraction, on_bad_example, columns, cache_dir, silent, report)


# ---------------------------------------------------------------------------------------------
# Tokenization (once, cached) and batches
# ---------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One training example: a prompt with a chosen and (unless SFT) a rejected response, as token ids
    after truncation. The chosen/rejected ids end with EOS (or, for chat rows, the end-of-turn token)."""
    prompt: str
    chosen: str
    rejected: Optional[str]
    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: Optional[List[int]]


def truncate(prompt_ids: List[int], response_ids: List[List[int]], truncation_mode: str,
             max_length: int, max_prompt_length: int) -> Tuple[List[int], List[List[int]]]:
    """The reference's rule: if prompt + longest response exceeds max_length, keep max_prompt_length
    prompt tokens (the start, or for dialogues the end); if still too long, cut every response to
    max_length - max_prompt_length tokens."""
    longest = max(len(r) for r in response_ids)
    if len(prompt_ids) + longest > max_length:
        prompt_ids = prompt_ids[:max_prompt_length] if truncation_mode == 'keep_start' else prompt_ids[-max_prompt_length:]
    if len(prompt_ids) + longest > max_length:
        response_ids = [r[:max_length - max_prompt_length] for r in response_ids]
    return prompt_ids, response_ids


def _tokenize(tokenizer, texts: List[str]) -> List[List[int]]:
    # split_special_tokens: text that happens to contain e.g. '<|endoftext|>' is data, not an EOS.
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)['input_ids'] if texts else []


def prompt_token_ids(tokenizer, data: Dict) -> Dict[str, List[int]]:
    """Token ids of every prompt of a data set, before truncation: a chat row's template ids, else the text's."""
    text_prompts = [p for p, e in data.items() if e.get('prompt_ids') is None]
    text_ids = dict(zip(text_prompts, _tokenize(tokenizer, text_prompts)))
    return {p: e.get('prompt_ids') or text_ids[p] for p, e in data.items()}


def tokenize_dataset(data: Dict, tokenizer, max_length: int, max_prompt_length: int, sft_mode: bool,
                     silent: bool = False) -> List[Example]:
    """Plain-text prompts and responses are tokenized as text (plus EOS for responses); chat rows bring
    their template's ids."""
    def given_ids(entry):  # per response: the chat template's ids, or None for text
        return entry.get('response_ids') or [None] * len(entry['responses'])

    prompt_ids = prompt_token_ids(tokenizer, data)
    texts = {r for e in data.values() for r, ids in zip(e['responses'], given_ids(e)) if ids is None}
    texts |= {e['sft_target'] for e in data.values() if e['sft_target'] not in e['responses']}
    texts = sorted(texts)
    eos = [tokenizer.eos_token_id]
    text_ids = {r: ids + eos for r, ids in zip(texts, _tokenize(tokenizer, texts))}
    examples = []
    for prompt, entry in tqdm(data.items(), total=len(data), desc='Tokenizing', disable=silent):
        responses = entry['responses']
        ids = [given if given is not None else text_ids[text] for text, given in zip(responses, given_ids(entry))]
        if sft_mode:
            target = entry['sft_target']
            target_ids = ids[len(responses) - 1 - responses[::-1].index(target)] if target in responses else text_ids[target]
            pairs = [(target, target_ids, None, None)]
        else:
            pairs = [(responses[i], ids[i], responses[j], ids[j]) for i, j in entry['pairs']]
        for chosen, chosen_ids, rejected, rejected_ids in pairs:
            p, rs = truncate(prompt_ids[prompt], [chosen_ids] if rejected is None else [chosen_ids, rejected_ids],
                             entry['truncation_mode'], max_length, max_prompt_length)
            examples.append(Example(prompt, chosen, rejected, p, rs[0], rs[1] if rejected is not None else None))
    return examples


def load_examples(names: List[str], tokenizer, split: str, max_length: int, max_prompt_length: int,
                  sft_mode: bool, cache_dir: str, eval_fraction: float = 0.05, silent: bool = False,
                  on_bad_example: str = 'error', columns: Optional[Dict[str, str]] = None) -> List[Example]:
    """Tokenized examples of every named data set, from the on-disk cache when it has them (built once,
    by one of the processes that arrive at the same time; the others wait and read it)."""
    columns = {**COLUMNS, **(columns or {})}
    specials, _ = chat_tokens.special_tokens(tokenizer)
    key = tokenized_cache.key([TOKENIZATION_VERSION, [data_sources.fingerprint(n) for n in names], split,
                               tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id, specials,
                               getattr(tokenizer, 'chat_template', None), max_length, max_prompt_length, sft_mode,
                               eval_fraction, on_bad_example, columns])
    say = (lambda message: None) if silent else (lambda message: print(message, flush=True))

    def build():
        examples, notes = [], []
        for name in names:
            data = get_dataset(name, split, tokenizer, silent=silent, cache_dir=cache_dir, eval_fraction=eval_fraction,
                               on_bad_example=on_bad_example, columns=columns, report=notes.append)
            examples += tokenize_dataset(data, tokenizer, max_length, max_prompt_length, sft_mode, silent)
        return examples, notes

    examples, notes = tokenized_cache.load_or_build(os.path.join(cache_dir, 'tokenized'), key, build, Example,
                                                    len(tokenizer), say)
    for note in notes:
        say(note)
    return examples


def load_split(config, tokenizer, split: str, cache_dir: str, silent: bool = False) -> List[Example]:
    """The examples train.py trains on (split='train') or evaluates from (split='test') for a composed
    config. Local files and hub ids hold out eval_fraction of their prompts, unless eval data is named:
    then the training data is used whole, and so is the named eval data."""
    held_out = config.eval_fraction if not config.eval_datasets else 0.0
    if split == 'test' and config.eval_datasets:
        names, fraction = config.eval_datasets, 1.0
    else:
        names, fraction = config.datasets, held_out
    return load_examples(list(names), tokenizer, split, config.max_length, config.max_prompt_length,
                         sft_mode=config.loss.name == 'sft', cache_dir=cache_dir, eval_fraction=fraction, silent=silent,
                         on_bad_example=config.on_bad_example, columns=dict(config.data_columns))


class RunData(NamedTuple):
    """What a run trains and evaluates on: the tokenizer, the training examples, and the examples that
    held-out evaluation draws from (empty when n_eval_examples is 0)."""
    tokenizer: object
    train: List[Example]
    eval: List[Example]


def load_run_data(config, cache_dir: str, silent: bool = False) -> RunData:
    """The tokenizer and both splits of a composed train.py config (train.py loads them before the models,
    so that a bad data file costs no model load)."""
    tokenizer = model_loading.load_tokenizer(config.model, cache_dir)
    return RunData(tokenizer, load_split(config, tokenizer, 'train', cache_dir, silent),
                   load_split(config, tokenizer, 'test', cache_dir, silent) if config.n_eval_examples else [])


# ---------------------------------------------------------------------------------------------
# The data inspection command
# ---------------------------------------------------------------------------------------------

def example_record(example: Example, pad_token_id: int) -> Dict:
    """An example exactly as training collates it (a batch of one, so unpadded), with the reference's
    keys: prompt_input_ids, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, and the texts."""
    batch = batches.collate([example], pad_token_id)
    return {k: (v[0].tolist() if torch.is_tensor(v) else v[0]) for k, v in batch.items() if not k.endswith('attention_mask')}


def describe(example: Example, index: int, total: int, split: str, tokenizer) -> str:
    """Decoded text of an example, the masked prompt part marked, with token counts."""
    kinds = [('chosen', example.chosen_ids)] + ([('rejected', example.rejected_ids)] if example.rejected_ids else [])
    counts = ' · '.join(f'{k} {len(ids)} tokens' for k, ids in kinds)
    lines = [f'━━━ {split} example {index + 1} of {total}: prompt {len(example.prompt_ids)} tokens (masked) · {counts}',
             '┌─ prompt (masked: labels -100, no loss) ─', tokenizer.decode(example.prompt_ids), '└─']
    for kind, ids in kinds:
        lines += [f'┌─ {kind} (trained) ─', tokenizer.decode(ids), '└─']
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(
        prog='python preference_datasets.py',
        description='Show what train.py would train on: the first N examples of a split as decoded text, the '
                    'prompt (masked) part marked, with token counts. The overrides after -- are train.py\'s.')
    parser.add_argument('--split', choices=('train', 'test'), default='train')
    parser.add_argument('--n', type=int, default=3, help='examples to print (default 3)')
    parser.add_argument('--json', metavar='OUT.jsonl', help='write every example of the split, one JSON object '
                        'per line, unpadded, exactly as training collates it')
    parser.add_argument('overrides', nargs='*', help="train.py's overrides, e.g. model=tiny datasets=[pairs.jsonl]")
    args = parser.parse_args(argv)
    import run_config  # the same composition and checks as train.py, less those of the trainer (none is built here)
    overrides = list(args.overrides)
    if not any(o.lstrip('+~').startswith('exp_name=') for o in overrides):
        overrides.append('exp_name=inspect_data')  # required by train.py, unused here
    try:
        config = run_config.compose_config(overrides)
        run_config.check_config(config)
    except Exception as e:  # Hydra's override and composition errors, and run_config.ConfigError
        sys.exit(f"config error: {'; '.join(line.strip() for line in str(e).strip().splitlines() if line.strip())}")
    cache_dir = utils.get_local_dir(config.local_dirs)
    tokenizer = model_loading.load_tokenizer(config.model, cache_dir)
    try:
        examples = load_split(config, tokenizer, args.split, cache_dir)
    except DataError as e:
        sys.exit(f'data error: {e}')
    data = config.eval_datasets if args.split == 'test' and config.eval_datasets else config.datasets
    print(f'{len(examples)} {args.split} examples ({"SFT" if config.loss.name == "sft" else "pairs"}) of '
          f'{"eval_datasets" if data is config.eval_datasets else "datasets"}={list(data)}, tokenizer '
          f'{os.path.basename(tokenizer.name_or_path.rstrip("/"))}, max_length={config.max_length}, '
          f'max_prompt_length={config.max_prompt_length}')
    for i, example in enumerate(examples[:args.n]):
        print(describe(example, i, len(examples), args.split, tokenizer))
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            f.writelines(json.dumps(example_record(e, tokenizer.pad_token_id)) + '\n' for e in examples)
        print(f'wrote {len(examples)} examples to {args.json}')


if __name__ == '__main__':
    import preference_datasets  # the importable module, so that its DataError is the one train.py catches
    preference_datasets.main()
