"""Evaluation entry point: `python -u evaluate.py policy=<run dir> reference=<run dir> prompts=<pairs.jsonl>`.

For a trained policy πθ and its reference π_ref, the two axes of the TDPO paper's reward–KL frontier
(Zeng et al. 2024, Fig. 2a): sample completions of held-out prompts from the policy (and the reference,
same seed), score them with a reward model, and estimate KL(πθ ‖ π_ref) on the policy's samples as
the mean over samples of Σ_t log πθ(y_t|x,y_<t) − log π_ref(y_t|x,y_<t). Writes one JSON file.

`python -u evaluate.py -m policy=A,B,C ...` (Hydra multirun) evaluates several checkpoints in one process;
the reference is loaded and sampled once. Samples are pure ancestral draws (temperature 1, no top-k/top-p)
so that they are draws from πθ and the KL estimate is unbiased.
"""
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import checkpoints
import distributed
import lora
import losses
import manifests
import model_loading
import preference_datasets
import run_config  # noqa: F401 (registers the config resolvers)
import sharded_trainers
import utils

KL_BATCH_SIZE = 8  # sequences per teacher-forced pass: bounds the (B, T, V) float32 log-softmax tensors


# ----------------------------------------------------------------------------------------------
# Rewards: text -> float, higher is better
# ----------------------------------------------------------------------------------------------

_VADER = None


def vader_reward(text: str) -> float:
    """VADER compound sentiment in [-1, 1] (Hutto & Gilbert 2014; a lexicon, no download): more positive
    is better, the offline stand-in for the paper's RoBERTa sentiment classifier."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _VADER = SentimentIntensityAnalyzer()
    return _VADER.polarity_scores(text)['compound']


REWARDS = {'vader': vader_reward}


# ----------------------------------------------------------------------------------------------
# Sampling and the KL estimate (pure functions of models and token ids)
# ----------------------------------------------------------------------------------------------

def cut_after_eos(ids: Sequence[int], eos_id: int) -> List[int]:
    """Generated ids up to and including the first EOS (the rest is padding)."""
    ids = list(ids)
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: List[List[int]], max_new_tokens: int, seed: int, batch_size: int,
           temperature: float = 1.0, desc: str = 'sampling') -> List[List[int]]:
    """Response ids per prompt (token ids, left-padded in batches): ancestral samples (top_k=0, top_p=1);
    each response ends at its first EOS or after max_new_tokens."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    response_ids = []
    start = time.time()
    for b in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[b:b + batch_size]
        width = max(map(len, rows))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + list(r) for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        response_ids += [cut_after_eos(r, tokenizer.eos_token_id) for r in out[:, width:].tolist()]
        print(f'  {desc}: {len(response_ids)}/{len(prompt_ids)} ({time.time() - start:.0f} s)', flush=True)
    return response_ids


def _right_padded(prompt_ids: List[List[int]], response_ids: List[List[int]], pad_id: int):
    """(input ids, attention mask, response mask), each (B, T) right-padded: positions count from 0 in
    every row, as in generation; response_mask marks the response tokens."""
    length = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    ids = torch.full((len(prompt_ids), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention[i, :len(p) + len(r)] = 1
        response[i, len(p):len(p) + len(r)] = True
    return ids, attention, response


@torch.no_grad()
def kl_estimates(policy, reference, prompt_ids: List[List[int]], response_ids: List[List[int]], pad_id: int,
                 batch_size: int = KL_BATCH_SIZE) -> Dict[str, List[float]]:
    """Per sample y ~ πθ(·|x) (teacher-forced, prompt masked, up to EOS), lists of floats:
      log_ratio = Σ_t log πθ(y_t|x,y_<t) − log π_ref(y_t|x,y_<t); its mean over samples is the
                  Monte-Carlo estimate of KL(πθ ‖ π_ref) over whole responses
      seq_kl    = Σ_t KL(πθ(·|x,y_<t) ‖ π_ref(·|x,y_<t)) over the vocabulary (same expectation, lower variance)
    Both from losses.tdpo_get_batch_logps with the models' roles swapped: its margin is then
    Σ_t log π_ref − log πθ and its SeqKL is KL(πθ ‖ π_ref)."""
    device = next(policy.parameters()).device
    out = {'log_ratio': [], 'seq_kl': []}
    for b in range(0, len(prompt_ids), batch_size):
        ids, attention, response = _right_padded(prompt_ids[b:b + batch_size], response_ids[b:b + batch_size], pad_id)
        ids, attention = ids.to(device), attention.to(device)
        labels = ids.masked_fill(~response.to(device), -100)
        reference_minus_policy, seq_kl, _ = losses.tdpo_get_batch_logps(
            reference(ids, attention_mask=attention).logits, policy(ids, attention_mask=attention).logits, labels)
        out['log_ratio'] += (-reference_minus_policy).tolist()
        out['seq_kl'] += seq_kl.tolist()
    return out


# ----------------------------------------------------------------------------------------------
# Loading what train.py wrote
# ----------------------------------------------------------------------------------------------

def _hf_model(path: str, dtype: str):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _checkpoint_model(checkpoint: str, dtype: str, trust: bool = False):
    """A step-N/ or LATEST/ checkpoint: the model of its run's config.yaml with the checkpoint's policy.pt
    (loaded weights_only; one with a manifest must verify; a LoRA run's holds the adapter: merged into the
    run's base model)."""
    if os.path.exists(os.path.join(checkpoint, checkpoints.MANIFEST)):
        try:
            checkpoints.verify(checkpoint)
        except checkpoints.Unverified as e:
            raise checkpoints.CheckpointError(f'checkpoint {checkpoint} is damaged: {e}') from None
    state = checkpoints.load_archive(os.path.join(checkpoint, 'policy.pt'), trust, mmap=True)['state']
    saved_config = OmegaConf.load(os.path.join(os.path.dirname(checkpoint), 'config.yaml'))
    cache_dir = utils.get_local_dir(list(saved_config.local_dirs))
    model = model_loading.load_model(saved_config.model, dtype, cache_dir)
    if lora.holds_adapter(state):
        policy = lora.wrap(_with_archive(model, saved_config, trust), saved_config.lora, saved_config.seed)
        lora.load_trainable_state(policy, state, f'{checkpoint}/policy.pt')
        model = policy.merge_and_unload()
    else:
        model_loading.load_weights(model, state, f'{checkpoint}/policy.pt', saved_config.model.name_or_path)
    return model, model_loading.load_tokenizer(saved_config.model, cache_dir)


def _with_archive(model, saved_config: DictConfig, trust: bool = False):
    """The base weights of a LoRA run: its model, with the model.archive it started from loaded."""
    if saved_config.model.archive:
        state = checkpoints.load_archive(saved_config.model.archive, trust, mmap=True)['state']
        model_loading.load_weights(model, state, saved_config.model.archive, saved_config.model.name_or_path)
    return model


def _adapter_model(path: str, dtype: str, trust: bool = False):
    """A LoRA adapter directory (a run's adapter/ export), merged into its base model: the run's (from the
    config.yaml beside it) or else the base_model_name_or_path its adapter_config.json names."""
    import peft
    import transformers
    run_config_path = os.path.join(os.path.dirname(path), 'config.yaml')
    if os.path.exists(run_config_path):
        saved_config = OmegaConf.load(run_config_path)
        cache_dir = utils.get_local_dir(list(saved_config.local_dirs))
        base = _with_archive(model_loading.load_model(saved_config.model, dtype, cache_dir), saved_config, trust)
    else:
        base_path = peft.PeftConfig.from_pretrained(path).base_model_name_or_path
        if not base_path:
            raise ValueError(f'{path}: a LoRA adapter whose base model is not recorded (random init or model.archive '
                             f'weights): evaluate it inside its run directory, or its merged hf/ export')
        base = _hf_model(base_path, dtype)[0]
    model = peft.PeftModel.from_pretrained(base, path).merge_and_unload()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _config_model(name: str, dtype: str = 'float32'):
    """`model:<name>`: config/model/<name>.yaml (untrained), loaded as train.py loads it; from inside
    evaluate.py's Hydra app, or from a plain script (demo/sentiment.py)."""
    from hydra.core.global_hydra import GlobalHydra
    overrides = [f'model={name}', 'exp_name=evaluate']
    if GlobalHydra.instance().is_initialized():
        config = hydra.compose('config', overrides=overrides)
    else:
        config_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config')
        with hydra.initialize_config_dir(config_dir=config_dir, version_base=None):
            config = hydra.compose('config', overrides=overrides)
    cache_dir = utils.get_local_dir(list(config.local_dirs))
    return model_loading.load_model(config.model, dtype, cache_dir), model_loading.load_tokenizer(config.model, cache_dir)


def resolve_model_path(spec: str) -> Tuple[str, str]:
    """(kind, path) of a model spec: ('config', name) for `model:<name>`; ('hf', dir) for a Hugging Face
    directory or a run directory's hf/ export; ('adapter', dir) for a LoRA adapter directory (a run's
    adapter/ export); ('checkpoint', dir) for a directory with policy.pt, or a run directory without hf/
    (its newest checkpoint)."""
    if spec.startswith('model:'):
        return 'config', spec[len('model:'):]
    path = os.path.abspath(spec)
    if os.path.exists(os.path.join(path, 'config.json')):
        return 'hf', path
    if os.path.exists(os.path.join(path, 'adapter_config.json')):
        return 'adapter', path
    if os.path.exists(os.path.join(path, 'policy.pt')):
        return 'checkpoint', path
    if os.path.exists(os.path.join(path, 'hf', 'config.json')):
        return 'hf', os.path.join(path, 'hf')
    checkpoint = checkpoints.latest_checkpoint(path)
    if checkpoint is not None:
        return 'checkpoint', checkpoint
    raise ValueError(f'{spec}: not a run directory (with hf/ or a checkpoint), a checkpoint directory (with '
                     f'policy.pt), a Hugging Face model directory (with config.json), a LoRA adapter directory '
                     f'(with adapter_config.json), or model:<config name>')


def examples_seen(kind: str, path: str, trust: bool = False) -> Optional[int]:
    """Training examples behind a model: a checkpoint's counter (an hf/ or adapter/ export: its run's LATEST);
    else None."""
    if kind in ('hf', 'adapter') and os.path.basename(path) in ('hf', lora.ADAPTER_EXPORT_DIR):
        path = os.path.join(os.path.dirname(path), 'LATEST')
    if kind == 'config' or not os.path.exists(os.path.join(path, checkpoints.TRAINING_STATE)):
        return None
    return checkpoints.checkpoint_step(path, trust)


def run_dtypes(kind: str, path: str) -> Tuple[str, str]:
    """(policy, reference) dtypes that the training run behind a resolved model spec computed in (the
    policy's under its trainer, and its reference's), read from the run's config.yaml, so that the KL
    reported is the KL the run trained against; float32 for a model without a run (model:<name>, a
    plain Hugging Face directory)."""
    run_dir = {'checkpoint': os.path.dirname(path), 'adapter': os.path.dirname(path),
               'hf': os.path.dirname(path) if os.path.basename(path) == 'hf' else None}.get(kind)
    if run_dir is None or not os.path.exists(os.path.join(run_dir, 'config.yaml')):
        return 'float32', 'float32'
    saved_config = OmegaConf.load(os.path.join(run_dir, 'config.yaml'))
    trainer_class = sharded_trainers.TRAINERS[saved_config.trainer]
    return trainer_class.policy_compute_dtype(saved_config.model), trainer_class.reference_dtype(saved_config.model)


def load(spec: str, dtype: str = 'float32', trust: bool = False):
    """(model in `dtype`, in eval mode on the GPU if there is one, tokenizer, kind, path) of a model spec;
    `trust`: trust_checkpoint_code."""
    kind, path = resolve_model_path(spec)
    if kind in ('checkpoint', 'adapter'):
        model, tokenizer = {'checkpoint': _checkpoint_model, 'adapter': _adapter_model}[kind](path, dtype, trust)
    else:
        model, tokenizer = {'config': _config_model, 'hf': _hf_model}[kind](path, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    model_loading.disable_dropout(model)
    return model.to(distributed.default_device()).eval(), tokenizer, kind, path


def read_prompts(path: str, tokenizer, n: Optional[int]) -> List[Tuple[str, List[int]]]:
    """(text, token ids) of the distinct prompts of a local preference file (any format train.py reads: HH
    dialogues, explicit `prompt`/`chosen`/`rejected` rows, chat messages), whole and in file order: the
    ids training gives them before truncation (a chat prompt's template ids, with special-token text inside
    a message kept as text)."""
    if not preference_datasets.is_local_file(path):
        raise ValueError(f'prompts={path}: expected a local .jsonl, .jsonl.gz, .json or .parquet file, or a '
                         f'save_to_disk directory, of preference pairs')
    data = preference_datasets.get_local(path, 'test', tokenizer, eval_fraction=1.0)  # 1.0: every row
    prompts = list(preference_datasets.prompt_token_ids(tokenizer, data).items())
    return prompts[:n] if n else prompts


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------

_REFERENCE_CACHE: Dict = {}  # multirun: the reference model and its scored samples, once per process


def default_out(kind: str, path: str) -> str:
    """eval.json beside the evaluated weights: in the checkpoint (or adapter) directory, or in the run
    directory for an hf/ export."""
    if kind == 'config':
        raise ValueError('policy=model:<name> has no directory of its own: set out=<path.json>')
    return os.path.join(os.path.dirname(path) if os.path.basename(path) == 'hf' else path, 'eval.json')


def score(model, tokenizer, prompts: List[Tuple[str, List[int]]], config: DictConfig, reward_fn, name: str) -> Dict:
    """Samples of `model` for (text, ids) prompts, decoded and scored by reward_fn."""
    prompt_ids = [ids for _, ids in prompts]
    response_ids = sample(model, tokenizer, prompt_ids, config.max_new_tokens, config.seed, config.batch_size,
                          desc=f'{name} samples')
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in response_ids]
    rewards = [reward_fn(t) for t in texts]
    return {'prompt_ids': prompt_ids, 'response_ids': response_ids, 'texts': texts, 'rewards': rewards}


def mean(values: List[float]) -> float:
    return sum(values) / len(values)


def stderr(values: List[float]) -> Optional[float]:
    """Standard error of the mean (None for a single value)."""
    return torch.tensor(values).std().item() / len(values) ** 0.5 if len(values) > 1 else None


def evaluate(config: DictConfig) -> Dict:
    """The evaluation of one policy against its reference (see the module docstring) as a dict."""
    start = time.time()
    reward_fn = REWARDS[config.reward]
    policy_dtype, reference_dtype = run_dtypes(*resolve_model_path(config.policy))  # as the policy was trained
    policy, tokenizer, kind, path = load(config.policy, policy_dtype, config.trust_checkpoint_code)
    reference_key = (config.reference, reference_dtype, config.prompts, config.n_prompts, config.samples_per_prompt,
                     config.max_new_tokens, config.seed, config.batch_size, config.reward)
    if reference_key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE.clear()
        reference, _, _, reference_path = load(config.reference, reference_dtype, config.trust_checkpoint_code)
        _REFERENCE_CACHE[reference_key] = {'model': reference, 'path': reference_path, 'scores': None}
    cached = _REFERENCE_CACHE[reference_key]
    reference = cached['model']
    distinct = read_prompts(config.prompts, tokenizer, config.n_prompts)
    prompts = [p for p in distinct for _ in range(config.samples_per_prompt)]
    scores = {'policy': score(policy, tokenizer, prompts, config, reward_fn, 'policy')}
    if config.score_reference:
        if cached['scores'] is None:
            cached['scores'] = score(reference, tokenizer, prompts, config, reward_fn, 'reference')
        scores['reference'] = cached['scores']
    kl = kl_estimates(policy, reference, scores['policy']['prompt_ids'], scores['policy']['response_ids'],
                      tokenizer.pad_token_id)
    result = {'policy': path, 'reference': cached['path'], 'examples_seen': examples_seen(kind, path, config.trust_checkpoint_code),
              'prompts_file': os.path.abspath(config.prompts), 'n_prompts': len(distinct),
              'samples_per_prompt': config.samples_per_prompt, 'n_samples': len(prompts),
              'max_new_tokens': config.max_new_tokens, 'seed': config.seed, 'reward': config.reward,
              'policy_dtype': policy_dtype, 'reference_dtype': reference_dtype,
              # Monte-Carlo estimate of KL(πθ ‖ π_ref) over whole responses, and its standard error
              'kl': mean(kl['log_ratio']),
              'kl_stderr': stderr(kl['log_ratio']),
              'seq_kl': mean(kl['seq_kl'])}  # Σ_t KL(πθ ‖ π_ref) over the vocabulary, averaged over samples
    for name, s in scores.items():
        result[f'{name}_reward'] = mean(s['rewards'])
        result[f'{name}_reward_stderr'] = stderr(s['rewards'])
        result[f'{name}_positive_share'] = mean([r > 0.05 for r in s['rewards']])
        result[f'{name}_response_tokens'] = mean([len(r) for r in s['response_ids']])
    user_turn = lambda p: p.split('<|im_start|>user\n')[-1].split('<|im_end|>')[0]  # chat-templated prompts
    result['examples'] = [dict({'prompt': user_turn(prompts[i][0])},
                               **{name: s['texts'][i] for name, s in scores.items()},
                               **{f'{name}_reward': s['rewards'][i] for name, s in scores.items()})
                          for i in range(0, min(config.n_examples * config.samples_per_prompt, len(prompts)),
                                         config.samples_per_prompt)]
    result['seconds'] = time.time() - start
    return result


def result_manifest(out: str) -> str:
    """The manifest that seals an evaluation result (manifests.write_manifest), beside it."""
    return out + '.manifest.json'


def evaluated(out: str) -> bool:
    """Whether `out` holds an intact evaluation result (its manifest verifies); a damaged one is named in
    one line (and evaluated again by the caller)."""
    if not os.path.exists(out):
        return False
    problem = manifests.manifest_problem(result_manifest(out))
    if problem is not None:
        print(f'evaluate: {out} is damaged ({problem}); evaluating again', flush=True)
        return False
    print(f'evaluate: {out} exists and verifies; skipping (skip_evaluated=true)', flush=True)
    return True


@hydra.main(version_base=None, config_path='config', config_name='evaluate')
def main(config: DictConfig):
    missing = [key for key in ('policy', 'reference', 'prompts') if OmegaConf.is_missing(config, key)]
    if missing:
        raise SystemExit(f'config error: missing required keys (e.g. policy=<run dir>): {", ".join(missing)}')
    if config.reward not in REWARDS:
        raise SystemExit(f'config error: reward={config.reward!r}; valid: {", ".join(REWARDS)}')
    try:
        out = config.out or default_out(*resolve_model_path(config.policy))
        if config.skip_evaluated and evaluated(out):
            return
        resolve_model_path(config.reference)
        result = evaluate(config)
    except (ValueError, FileNotFoundError, checkpoints.CheckpointError) as e:  # a full disk: DiskFullError
        raise SystemExit(f'evaluate: {e}')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(out + '.tmp', out)
    manifests.write_manifest(result_manifest(out), [out])
    print(json.dumps({k: v for k, v in result.items() if k != 'examples'}, indent=1))
    print(f'wrote {out}', flush=True)


if __name__ == '__main__':
    main()
