"""Token ids of a chat conversation exactly as the tokenizer's chat template gives them at inference, with
message content kept as text.

At inference a chat prompt is `apply_chat_template(messages, add_generation_prompt=True)` tokenized with its
special tokens (`<|im_start|>`, `<|im_end|>`, ...) as single ids. Training must see the same ids, and only the
template may open or close a turn: special-token text inside a message is data. So the special-token text
of every message is first replaced by placeholders, the template is rendered, its own special tokens become
ids, and the text between them (placeholders restored) is tokenized as plain text. Without special-token
text in any message, the ids are simply `tokenizer(rendered text)`, exactly what inference feeds the model.
"""
import functools
import re
from typing import Dict, FrozenSet, List, Tuple

from data_sources import DataError

_MARK = re.compile('\ue000(\\d+)\ue001')  # the placeholder of special-token text inside a message


@functools.lru_cache(maxsize=8)
def _pattern(specials: Tuple[str, ...]) -> 're.Pattern':
    return re.compile('(' + '|'.join(map(re.escape, specials)) + ')')


def special_tokens(tokenizer) -> Tuple[Tuple[str, ...], FrozenSet[int]]:
    """The tokenizer's special-token strings (longest first, then by text: the same order in every process)
    and their ids: what `tokenizer(text)` turns into one id each and `split_special_tokens=True` leaves as text."""
    tokens = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
    return (tuple(sorted({t.content for t in tokens}, key=lambda s: (-len(s), s))),
            frozenset(tokenizer.convert_tokens_to_ids([t.content for t in tokens])))


def _mark_messages(messages: List[Dict], specials: Tuple[str, ...], table: List[str]) -> List[Dict]:
    """Messages whose special-token text (and our placeholder characters) is replaced by placeholders
    recorded in `table`, so the rendered template's own special tokens are the only ones left."""
    pattern = _pattern(specials + ('\ue000', '\ue001'))

    def mark(match):
        table.append(match.group(0))
        return f'\ue000{len(table) - 1}\ue001'
    return [{**m, 'content': pattern.sub(mark, m['content'])} for m in messages]


def _unmark(marked: str, table: List[str]) -> str:
    return _MARK.sub(lambda m: table[int(m.group(1))], marked) if table else marked


def _ids(tokenizer, marked: str, table: List[str]) -> List[int]:
    """Token ids of rendered template text: its special tokens are special, message content is text."""
    if not table:  # no special-token text in any message: exactly what tokenizer(text) gives at inference
        return tokenizer(marked, add_special_tokens=False)['input_ids']
    ids = []
    for i, part in enumerate(_pattern(special_tokens(tokenizer)[0]).split(marked)):
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(part))
        elif part:
            ids += tokenizer(_unmark(part, table), add_special_tokens=False, split_special_tokens=True)['input_ids']
    return ids


def conversation_ids(tokenizer, prompt: List[Dict], responses: List[List[Dict]], where: str
                     ) -> Tuple[str, List[str], List[int], List[List[int]]]:
    """(prompt text, response texts, prompt ids, response ids) of a prompt and its alternative responses
    (message lists). Prompt ids = the template of the prompt messages with the generation prompt; each
    response = the continuation of the whole conversation's template, ending with its end-of-turn token
    (the whitespace a template writes after it is not part of the response; without one, EOS is appended).
    The response texts are the continuations without that end-of-turn token."""
    if not getattr(tokenizer, 'chat_template', None):
        raise DataError(f'{where}: chat-message rows need a tokenizer with a chat template')
    if prompt[-1]['role'] == 'assistant':
        raise DataError(f"{where}: the prompt ends with an assistant message; it must end with the turn the "
                        f"response answers")
    specials, special_ids = special_tokens(tokenizer)
    table = []
    prompt, responses = _mark_messages(prompt, specials, table), [_mark_messages(r, specials, table) for r in responses]
    try:
        prompt_marked = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_marked = [tokenizer.apply_chat_template(prompt + r, tokenize=False) for r in responses]
    except Exception as e:  # the template's own checks (e.g. roles must alternate) raise all kinds of errors
        raise DataError(f'{where}: the chat template rejects these messages: {str(e).splitlines()[0]}') from e
    prompt_ids = _ids(tokenizer, prompt_marked, table)
    texts, ids = [], []
    for name, full in zip(('chosen', 'rejected'), full_marked):
        if not full.startswith(prompt_marked):
            raise DataError(f'{where}: the chat template renders the prompt differently with the {name} response appended')
        rest = full[len(prompt_marked):]
        full_ids = _ids(tokenizer, full, table)
        # the response's ids are the conversation's after the prompt's; where the tokens at the boundary
        # merge differently (a response starting with newlines), the continuation is tokenized on its own
        response_ids = (full_ids[len(prompt_ids):] if full_ids[:len(prompt_ids)] == prompt_ids
                        else _ids(tokenizer, rest, table))
        last = max((i for i, t in enumerate(response_ids) if t in special_ids), default=None)
        if last is not None and not tokenizer.decode(response_ids[last + 1:]).strip():
            response_ids = response_ids[:last + 1]
            rest = rest[:[m.start() for m in _pattern(specials).finditer(rest)][-1]]
        else:
            response_ids = response_ids + [tokenizer.eos_token_id]
        text = _unmark(rest, table)
        if not text.strip():
            raise DataError(f'{where}: empty {name}')
        texts.append(text)
        ids.append(response_ids)
    return _unmark(prompt_marked, table), texts, prompt_ids, ids
