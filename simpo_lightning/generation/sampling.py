"""Sampling responses from a policy: N per prompt, batched with a KV cache and left padding, prompts
sorted by length, each (prompt, sample) drawn from its own random generator.

A sample's generator is seeded by the run's seed, the prompt's tokens and the sample's index, and it
draws one token per step; a batch is decoded by ``transformers``' ``generate`` (greedy over scores
where only the drawn token is left finite), so a sample does not depend on which rows share its
batch, on their order, on how many processes split the prompts, or on a restart. Temperature 0 is
plain greedy decoding.
"""

import hashlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from simpo_lightning.errors import require


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    n: int = 4
    """Samples per prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 is greedy decoding (then every sample of a prompt is the same)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 64
    """Tokens per response at most; a response without end-of-sequence by then is kept and flagged."""
    min_new_tokens: int = 0
    """End-of-sequence is refused before this many tokens (equal to max_new_tokens: fixed lengths)."""
    seed: int = 0
    """With the prompt and the sample's index, seeds each sample's generator."""
    batch_size: int = 32
    """Sequences (prompts times samples) per forward pass, in whole prompts: at least ``n``."""

    def __post_init__(self) -> None:
        require(self.n >= 1, f"sampling.n = {self.n}: at least one sample per prompt")
        require(self.temperature >= 0, f"sampling.temperature = {self.temperature}: must be ≥ 0 (0 is greedy)")
        require(0 < self.top_p <= 1, f"sampling.top_p = {self.top_p}: must be in (0, 1]")
        require(self.max_new_tokens >= 1, f"sampling.max_new_tokens = {self.max_new_tokens}: must be ≥ 1")
        require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"sampling.min_new_tokens = {self.min_new_tokens}: must be in [0, max_new_tokens = {self.max_new_tokens}]",
        )
        require(self.batch_size >= 1, f"sampling.batch_size = {self.batch_size}: must be ≥ 1")


@dataclass
class Sample:
    """One response: its token ids (without end-of-sequence) and whether it ended (``stop``) or ran out (``length``)."""

    tokens: list[int]
    finish_reason: str


def derived_seed(*parts: object, bits: int = 63) -> int:
    """A seed of ``bits`` bits that is a function of ``parts`` (their ``repr``) alone: the same in every
    process, run and resumed run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**bits - 1)


def sample_seed(seed: int, prompt: list[int], index: int) -> int:
    """The seed of sample ``index`` of ``prompt``: a function of the three alone."""
    return derived_seed(seed, prompt, index)


class SeededSampler(LogitsProcessor):
    """Draws each row's next token with that row's own generator and leaves only it finite, for greedy
    decoding to pick; applies temperature and top-p first."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.generators is None:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            outside = ordered.cumsum(-1) - ordered >= self.top_p  # tokens after the nucleus is full
            probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
        # inverse CDF at one uniform draw per row: one number from each generator, not one per vocabulary entry
        uniform = torch.stack(
            [torch.rand((), generator=g, device=g.device, dtype=torch.float64) for g in self.generators]
        )
        cdf = probs.double().cumsum(-1)
        drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
        last = (probs > 0).long().cumsum(-1).argmax(-1, keepdim=True)  # rounding must not pick a 0-probability token
        drawn = torch.minimum(drawn, last).squeeze(-1)
        return torch.full_like(scores, float("-inf")).scatter(-1, drawn[:, None], 0.0)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    config: SamplingConfig,
    progress: bool = False,
    sort: bool = True,
    synced_gpus: bool = False,
) -> list[list[Sample]]:
    """``config.n`` samples of every tokenised prompt, in the prompts' order (batched longest first, so a
    batch's prompts are of similar length; ``sort`` false keeps the given order, for comparison).
    ``synced_gpus``: every process of a sharded model steps until all are done (``generate``'s lockstep)."""
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p])) if sort else list(range(len(prompts)))
    out: list[list[Sample | None]] = [[None] * config.n for _ in prompts]
    was_training = model.training
    model.eval()
    root = _sharded_root(model)
    if root is not None:
        # generate calls the model inside the sharded root: one forward through the root first sets FSDP up
        # from the root (its layers would otherwise become roots of their own), then the root's weights stay
        # gathered while generating.
        root(input_ids=torch.tensor([[tokenizer.eos_token_id]], device=_device(model)))
        root.unshard()
    bar = _progress(len(prompts) * config.n, progress)
    start, tokens = time.perf_counter(), 0
    per_batch = max(1, config.batch_size // config.n)  # prompts per forward pass, each with all its samples
    for first in range(0, len(order), per_batch):
        chunk = order[first : first + per_batch]
        batch = [(p, k) for p in chunk for k in range(config.n)]
        ids, mask = _left_padded([prompts[p] for p in chunk], tokenizer.pad_token_id, _device(model))
        cache = _prompt_cache(model, ids, mask, config.n)
        ids, mask = ids.repeat_interleave(config.n, 0), mask.repeat_interleave(config.n, 0)
        processors = LogitsProcessorList()
        if config.temperature > 0:
            seeds = [sample_seed(config.seed, prompts[p], k) for p, k in batch]
            processors.append(SeededSampler(seeds, config.temperature, config.top_p))
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens or None,
            do_sample=False,
            use_cache=True,
            cache=cache,
            logits_processor=processors,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            num_beams=1,
            synced_gpus=synced_gpus,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for (p, k), row in zip(batch, generated[:, ids.shape[1] :].tolist()):
            ended = eos in row
            response = row[: row.index(eos)] if ended else row
            out[p][k] = Sample(response, "stop" if ended else "length")
            tokens += len(response)
        if bar is not None:
            bar.update(len(batch))
            seconds = time.perf_counter() - start
            bar.set_postfix(samples_s=f"{bar.n / seconds:.1f}", tokens_s=f"{tokens / seconds:.0f}")
    if bar is not None:
        bar.close()
    if root is not None:
        root.reshard()
    model.train(was_training)
    return out


def greedy_answers(model: nn.Module, tokenizer, prompts: list[list[int]], config: SamplingConfig) -> list[str]:
    """The decoded greedy answer to each tokenised prompt (``config``: its lengths and batch size)."""
    config = SamplingConfig(**{**vars(config), "n": 1, "temperature": 0.0})
    return [
        tokenizer.decode(s.tokens, skip_special_tokens=True)
        for (s,) in sample_responses(model, tokenizer, prompts, config)
    ]


def _prompt_cache(model: nn.Module, ids: Tensor, mask: Tensor, n: int):
    """The KV cache of the prompts but their last token, computed once per prompt and repeated for its ``n``
    samples (``generate`` would compute it once per sample); positions as ``generate`` gives them."""
    if ids.shape[1] < 2:
        return None
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    supports = getattr(model, "_supports_logits_to_keep", None)
    keep = {"logits_to_keep": 1} if supports is not None and supports() else {}
    out = model(
        input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True, **keep
    )
    out.cache.batch_repeat_interleave(n)
    return out.cache


def _sharded_root(model: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    return model if isinstance(model, FSDPModule) else None


def _left_padded(prompts: list[list[int]], pad_token_id: int, device) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask of prompts padded on the left to the longest, on ``device``."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, shown: bool):
    if not shown:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="generating")
