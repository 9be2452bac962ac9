"""Batches: tokenized examples (`preference_datasets.Example`) collated into the padded, masked batch dicts the
trainers consume (`collate`, with the reference's keys), the training order over epochs that a resumed run
continues exactly (`batch_iterator`), how many examples a run trains on (`n_train_examples`), and which examples
it evaluates on (`eval_examples`)."""
import random
from typing import Dict, Iterable, Iterator, List, Optional

import torch

from data_sources import DataError


def _right_pad(seqs: List[List[int]], pad: int) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (length - len(s)) for s in seqs], dtype=torch.long)


def collate(examples: List, pad_token_id: int) -> Dict:
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


def eval_examples(examples: Iterable, seed: int, n_eval_examples: Optional[int], world_size: int) -> List:
    """The examples a run evaluates on: `examples` shuffled with `seed`, the first n_eval_examples (null: none), fewer
    where needed so that each of `world_size` ranks gets an equal slice."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_eval = min(n_eval_examples or 0, len(examples))
    return examples[:n_eval - n_eval % world_size]  # equal slices per rank


def n_train_examples(n_available: int, config) -> int:
    """Examples a run of `config` trains on from `n_available`: whole batches only, as batch_iterator yields
    them; 0 when there are fewer than one batch (batch_iterator then says so)."""
    per_epoch = n_available // config.batch_size * config.batch_size
    limits = [n // config.batch_size * config.batch_size
              for n in (config.n_examples, config.n_epochs and config.n_epochs * per_epoch) if n]
    return min(limits, default=0)


def batch_iterator(examples: List, batch_size: int, pad_token_id: int, shuffle: bool = True, seed: int = 0,
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
