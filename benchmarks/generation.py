"""Sampling speed: this package's batched sampler against ``generate(num_return_sequences=N)`` one prompt at a
time, and against batching without sorting the prompts by length; same model, prompts, N and lengths.

    python benchmarks/generation.py                       # SmolLM2-135M, 48 demo questions, N = 4, 32 tokens
    python benchmarks/generation.py --source ../shared/data/hh-rlhf-harmless-test.jsonl.gz  # prompts of many lengths
    python benchmarks/generation.py --tiny --prompts 8    # a 2-layer random model: checks the script runs

Every response has exactly ``tokens`` new tokens (``min_new_tokens = max_new_tokens``), so each way does
the same work; tokens per second count the sampled tokens. Each way runs after one warm-up batch.
"""

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="demo", help="prompts: demo, or any file the generate command reads")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max_prompt_length", type=int, default=256, help="longer prompts are left out")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sample")
    parser.add_argument("--batch_size", type=int, default=64, help="sequences per forward pass (ours)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    from simpo_lightning.generation.commands import read_prompts
    from simpo_lightning.generation.sampling import SamplingConfig, sample_responses
    from simpo_lightning.models.checkpoints import inference_policy
    from simpo_lightning.models.loading import PolicyConfig, build_policy, load_tokenizer
    from simpo_lightning.models.tiny import TINY_ARCHITECTURE

    if args.tiny:
        policy = PolicyConfig(random_init=True, config_overrides=TINY_ARCHITECTURE)
        model, tokenizer = build_policy(policy, None).eval(), load_tokenizer(policy)
        model.config.use_cache = True
    else:
        model, tokenizer = inference_policy(None)
    rows = read_prompts(args.source, tokenizer, max_prompt_length=args.max_prompt_length)
    prompts = [r.tokens for r in rows[: args.prompts]]
    config = SamplingConfig(
        n=args.n, temperature=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens, batch_size=args.batch_size
    )
    work = len(prompts) * args.n * args.tokens
    print(
        f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.n} samples each, "
        f"{args.tokens} new tokens per sample; {torch.get_num_threads()} threads",
        flush=True,
    )

    def one_prompt_at_a_time() -> None:
        for prompt in prompts:
            model.generate(
                input_ids=torch.tensor([prompt]),
                do_sample=True,
                num_return_sequences=args.n,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                pad_token_id=tokenizer.pad_token_id,
            )

    ways = {
        "generate(num_return_sequences), one prompt at a time": one_prompt_at_a_time,
        "ours, batched without sorting": lambda: sample_responses(model, tokenizer, prompts, config, sort=False),
        "ours, batched and sorted by length": lambda: sample_responses(model, tokenizer, prompts, config),
    }
    results = {}
    with torch.no_grad():
        sample_responses(model, tokenizer, prompts[:2], config)  # warm-up
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            results[name] = work / (time.perf_counter() - start)
            print(f"{name}: {results[name]:.0f} tokens/s", flush=True)
    base = results[next(iter(ways))]
    print("\n| way | tokens/s | ×one prompt at a time |\n|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
