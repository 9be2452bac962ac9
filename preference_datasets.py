"""Preference data: hub data sets (hh, shp, se) parsed as the reference does, local files, one-time
tokenization (cached on disk), and padded, masked batches.

A data set becomes `{prompt: {'responses': [str], 'pairs': [(i_chosen, i_rejected)], 'sft_target': str,
'truncation_mode': 'keep_end' | 'keep_start'}}`, is tokenized once into `Example`s, and
`batch_iterator` shuffles and collates them into the batches the trainers consume.
"""
import gzip
import hashlib
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

import utils

HUB_DATASETS = ('hh', 'shp', 'se')
LOCAL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.json')
ASSISTANT = '\n\nAssistant:'
# Bump when tokenization changes, so stale caches are not reused.
TOKENIZATION_VERSION = 1


class DataError(ValueError):
    """Bad input data; the message names the file (or data set) and line (or row)."""


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


def _group(rows, truncation_mode: str) -> Dict:
    """(prompt, chosen, rejected) rows -> the reference's per-prompt dict (chosen is the SFT target)."""
    data = defaultdict(lambda: {'responses': [], 'pairs': [], 'truncation_mode': truncation_mode})
    for prompt, chosen, rejected in rows:
        entry = data[prompt]
        n = len(entry['responses'])
        entry['pairs'].append((n, n + 1))
        entry['responses'].extend([chosen, rejected])
        entry['sft_target'] = chosen
    return dict(data)


# ---------------------------------------------------------------------------------------------
# Hugging Face hub data sets, parsed exactly as the reference implementation parses them
# ---------------------------------------------------------------------------------------------

def _load_hub(path: str, name: str, cache_dir: Optional[str], **kwargs):
    import datasets
    if not utils.hub_reachable():
        os.environ['HF_HUB_OFFLINE'] = '1'  # use the local HF cache only, without minutes of retries
    try:
        return datasets.load_dataset(path, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        raise DataError(
            f"cannot load data set {name!r} ({path}) from the Hugging Face hub or its local cache: {e}\n"
            f"Offline, download it elsewhere and name the local file instead, e.g. "
            f"datasets=[/path/to/{name}-train.jsonl] (HH format: one JSON object per line with 'chosen' and "
            f"'rejected' dialogues; or 'prompt'/'chosen'/'rejected'). See README 'Data'.") from e


def get_hh(split: str, silent: bool = False, cache_dir: Optional[str] = None, on_bad_example: str = 'error') -> Dict:
    rows = _load_hub('Anthropic/hh-rlhf', 'hh', cache_dir, split=split)
    parsed, bad = [], BadRows(f'hh {split}', on_bad_example)
    for i, r in enumerate(tqdm(rows, desc='Processing HH', disable=silent)):
        try:
            parsed.append(split_hh_row(r['chosen'], r['rejected'], f'hh {split} row {i}'))
        except DataError as e:
            bad.handle(e)
    bad.report()
    return _group(parsed, 'keep_end')


def get_shp(split: str, silent: bool = False, cache_dir: Optional[str] = None, on_bad_example: str = 'error') -> Dict:
    """Stanford Human Preferences; pairs whose score ratio is below 2 are dropped, as in the reference."""
    rows = _load_hub('stanfordnlp/SHP', 'shp', cache_dir, split=split)
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


def get_se(split: str, silent: bool = False, cache_dir: Optional[str] = None, on_bad_example: str = 'error') -> Dict:
    """Stack Exchange preferences: a seeded 1% of the train split is the test split, as in the reference."""
    rows = _load_hub('HuggingFaceH4/stack-exchange-preferences', 'se', cache_dir)['train'].shuffle(seed=42)
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
# Local files
# ---------------------------------------------------------------------------------------------

def is_local_file(name: str) -> bool:
    return name.endswith(LOCAL_SUFFIXES)


def read_json_rows(path: str) -> Iterator[Tuple[str, object]]:
    """(location 'file:line', row) for each object of a .jsonl, .jsonl.gz or .json (a list) file; a
    malformed line comes as a DataError in place of the row, for the caller to raise or skip."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: no such data file')
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8') as f:
        if path.endswith('.json'):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f'{path}:{e.lineno}: malformed JSON ({e.msg})') from e
            if not isinstance(rows, list):
                raise DataError(f'{path}: a .json data file must hold a list of objects')
            yield from ((f'{path}: item {i}', r) for i, r in enumerate(rows))
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = DataError(f'{path}:{line_no}: malformed JSON ({e.msg})')
            yield f'{path}:{line_no}', row


def _render_response(prompt_text: str, prompt_messages, response, tokenizer, where: str) -> str:
    """A response given as text, or as chat messages rendered with the tokenizer's chat template
    (the part after the rendered prompt, without the end-of-turn token, which is appended later)."""
    if isinstance(response, str):
        return response
    if prompt_messages is None or not isinstance(response, list):
        raise DataError(f"{where}: 'chosen'/'rejected' must be strings, or chat-message lists when 'prompt' is one")
    full = tokenizer.apply_chat_template(prompt_messages + list(response), tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError(f'{where}: the chat template renders the prompt differently with the response appended')
    text = full[len(prompt_text):].rstrip()
    return text[:-len(tokenizer.eos_token)] if text.endswith(tokenizer.eos_token) else text


def parse_local_row(row, where: str, tokenizer) -> Tuple[str, str, str, str]:
    """One local row -> (prompt, chosen, rejected, truncation_mode). HH format ('chosen'/'rejected'
    dialogues) or explicit ('prompt'/'chosen'/'rejected' strings, or chat-message lists)."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object, got {type(row).__name__}')
    for key in ('chosen', 'rejected'):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (have {sorted(row)})")
    if 'prompt' not in row:
        if not (isinstance(row['chosen'], str) and isinstance(row['rejected'], str)):
            raise DataError(f"{where}: HH-format 'chosen'/'rejected' must be strings")
        return (*split_hh_row(row['chosen'], row['rejected'], where), 'keep_end')
    prompt = row['prompt']
    messages = None
    if not isinstance(prompt, str):
        if not getattr(tokenizer, 'chat_template', None):
            raise DataError(f'{where}: chat-message rows need a tokenizer with a chat template')
        messages = list(prompt)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chosen, rejected = (_render_response(prompt, messages, row[k], tokenizer, where) for k in ('chosen', 'rejected'))
    for name, text in (('prompt', prompt), ('chosen', chosen), ('rejected', rejected)):
        if not text.strip():
            raise DataError(f'{where}: empty {name}')
    return prompt, chosen, rejected, 'keep_start'


def _is_eval_prompt(prompt: str, eval_fraction: float) -> bool:
    """Deterministic held-out slice of a local file: a stable hash of the prompt, so every pair of a
    prompt lands on the same side and the split never changes between runs or machines."""
    return int.from_bytes(hashlib.md5(prompt.encode('utf-8')).digest()[:8], 'big') < eval_fraction * 2 ** 64


class BadRows:
    """on_bad_example: 'error' raises the first bad row's DataError; 'skip' counts and reports them."""

    def __init__(self, source: str, on_bad_example: str = 'error'):
        self.source, self.skip, self.errors = source, on_bad_example == 'skip', []

    def handle(self, error: DataError):
        if not self.skip:
            raise error
        self.errors.append(str(error))

    def report(self):
        if self.errors:
            print(f'skipped {len(self.errors)} bad rows of {self.source} (on_bad_example=skip); '
                  f'first: {self.errors[0]}', flush=True)


def get_local(path: str, split: str, tokenizer, eval_fraction: float, on_bad_example: str = 'error') -> Dict:
    data, modes, bad = {}, {}, BadRows(path, on_bad_example)
    for where, row in read_json_rows(path):
        try:
            prompt, chosen, rejected, mode = parse_local_row(row, where, tokenizer)
        except DataError as e:
            bad.handle(e)
            continue
        if (split == 'test') == _is_eval_prompt(prompt, eval_fraction):
            data.setdefault(prompt, []).append((prompt, chosen, rejected))
            modes.setdefault(prompt, mode)
    bad.report()
    if not data:
        raise DataError(f'{path}: no {split} pairs (eval_fraction={eval_fraction})')
    grouped = _group((r for rows in data.values() for r in rows), 'keep_start')
    for prompt, entry in grouped.items():  # a file may mix HH dialogues (keep_end) and explicit rows
        entry['truncation_mode'] = modes[prompt]
    return grouped


def get_dataset(name: str, split: str, tokenizer=None, silent: bool = False, cache_dir: Optional[str] = None,
                eval_fraction: float = 0.05, on_bad_example: str = 'error') -> Dict:
    if is_local_file(name):
        return get_local(name, split, tokenizer, eval_fraction, on_bad_example)
    loaders = {'hh': get_hh, 'shp': get_shp, 'se': get_se}
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}: valid names are {', '.join(HUB_DATASETS)}, or a local "
                        f"file ending in {', '.join(LOCAL_SUFFIXES)} (no such file: {os.path.abspath(name)})")
    return loaders[name](split, silent=silent, cache_dir=cache_dir, on_bad_example=on_bad_example)


# ---------------------------------------------------------------------------------------------
# Tokenization (once, cached) and batches
# ---------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One training example: a prompt with a chosen and (unless SFT) a rejected response, as token ids
    after truncation. The chosen/rejected ids end with EOS."""
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
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)['input_ids']


def tokenize_dataset(data: Dict, tokenizer, max_length: int, max_prompt_length: int, sft_mode: bool,
                     silent: bool = False) -> List[Example]:
    prompts = list(data)
    entries = [data[p] for p in prompts]
    responses = sorted({r for e in entries for r in (e['responses'] + [e['sft_target']])})
    prompt_ids = dict(zip(prompts, _tokenize(tokenizer, prompts)))
    eos = [tokenizer.eos_token_id]
    response_ids = {r: ids + eos for r, ids in zip(responses, _tokenize(tokenizer, responses))}
    examples = []
    for prompt, entry in tqdm(zip(prompts, entries), total=len(prompts), desc='Tokenizing', disable=silent):
        pairs = [(entry['sft_target'], None)] if sft_mode else [(entry['responses'][i], entry['responses'][j])
                                                                for i, j in entry['pairs']]
        for chosen, rejected in pairs:
            texts = [chosen] if rejected is None else [chosen, rejected]
            p, rs = truncate(prompt_ids[prompt], [response_ids[t] for t in texts], entry['truncation_mode'],
                             max_length, max_prompt_length)
            examples.append(Example(prompt, chosen, rejected, p, rs[0], rs[1] if rejected is not None else None))
    return examples


def _cache_key(names, split, tokenizer, max_length, max_prompt_length, sft_mode, eval_fraction, on_bad_example) -> str:
    sources = []
    for name in names:
        if is_local_file(name) and os.path.isfile(name):
            st = os.stat(name)
            sources.append((os.path.abspath(name), st.st_size, st.st_mtime_ns))
        else:
            sources.append(name)
    key = json.dumps([TOKENIZATION_VERSION, sources, split, tokenizer.name_or_path, len(tokenizer),
                      tokenizer.eos_token_id, max_length, max_prompt_length, sft_mode, eval_fraction, on_bad_example])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_examples(names: List[str], tokenizer, split: str, max_length: int, max_prompt_length: int,
                  sft_mode: bool, cache_dir: str, eval_fraction: float = 0.05, silent: bool = False,
                  on_bad_example: str = 'error') -> List[Example]:
    """Tokenized examples of every named data set, from the on-disk cache when it has them."""
    key = _cache_key(names, split, tokenizer, max_length, max_prompt_length, sft_mode, eval_fraction, on_bad_example)
    path = os.path.join(cache_dir, 'tokenized', key + '.pt')
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    examples = []
    for name in names:
        data = get_dataset(name, split, tokenizer, silent=silent, cache_dir=cache_dir, eval_fraction=eval_fraction,
                           on_bad_example=on_bad_example)
        examples += tokenize_dataset(data, tokenizer, max_length, max_prompt_length, sft_mode, silent)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(examples, f'{path}.tmp{os.getpid()}')
    os.replace(f'{path}.tmp{os.getpid()}', path)
    return examples


def _right_pad(seqs: List[List[int]], pad: int) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (length - len(s)) for s in seqs], dtype=torch.long)


def collate(examples: List[Example], pad_token_id: int) -> Dict:
    """Examples -> batch dict with the reference's keys. Sequences are right-padded (labels -100 on
    prompt and padding); prompts alone are left-padded, for generation."""
    batch = {'prompt': [e.prompt for e in examples]}
    longest_prompt = max(len(e.prompt_ids) for e in examples)
    batch['prompt_input_ids'] = torch.tensor([[pad_token_id] * (longest_prompt - len(e.prompt_ids)) + e.prompt_ids
                                              for e in examples], dtype=torch.long)
    batch['prompt_attention_mask'] = torch.tensor([[0] * (longest_prompt - len(e.prompt_ids)) + [1] * len(e.prompt_ids)
                                                   for e in examples], dtype=torch.long)
    kinds = ('chosen',) if examples[0].rejected_ids is None else ('chosen', 'rejected')
    for kind in kinds:
        responses = [getattr(e, f'{kind}_ids') for e in examples]
        batch[kind] = [e.prompt + getattr(e, kind) for e in examples]
        batch[f'{kind}_response_only'] = [getattr(e, kind) for e in examples]
        batch[f'{kind}_input_ids'] = _right_pad([e.prompt_ids + r for e, r in zip(examples, responses)], pad_token_id)
        batch[f'{kind}_attention_mask'] = _right_pad([[1] * (len(e.prompt_ids) + len(r)) for e, r in zip(examples, responses)], 0)
        batch[f'{kind}_labels'] = _right_pad([[-100] * len(e.prompt_ids) + r for e, r in zip(examples, responses)], -100)
    return batch


def batch_iterator(examples: List[Example], batch_size: int, pad_token_id: int, shuffle: bool = True, seed: int = 0,
                   n_epochs: Optional[int] = None, n_examples: Optional[int] = None,
                   drop_last: bool = True, skip_batches: int = 0) -> Iterator[Dict]:
    """Collated batches over `examples` until n_epochs epochs or n_examples examples (whichever comes
    first). Each epoch's order depends only on (seed, epoch), so a resumed run continues the same
    sequence after `skip_batches` batches. Training drops a last partial batch, so every update sees
    batch_size examples."""
    assert n_epochs is not None or n_examples is not None, 'need n_epochs or n_examples'
    if drop_last and len(examples) < batch_size:
        raise DataError(f'only {len(examples)} examples, fewer than one batch of {batch_size}')
    yielded, epoch, index = 0, 0, 0
    while n_epochs is None or epoch < n_epochs:
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if n_examples is not None and len(chunk) > n_examples - yielded:
                chunk = chunk[:n_examples - yielded]
                if drop_last or not chunk:
                    return  # the n_examples limit leaves no full batch (later epochs would not either)
            if not chunk or (drop_last and len(chunk) < batch_size):
                break
            if index >= skip_batches:
                yield collate([examples[i] for i in chunk], pad_token_id)
            index += 1
            yielded += len(chunk)
            if n_examples is not None and yielded >= n_examples:
                return
        epoch += 1
