"""Generation speed: kdtune with the KV cache, kdtune without it, and transformers' ``generate``.

Writes a random checkpoint of a small but real-shaped Qwen2-style model (4 layers, hidden 512,
GQA 8/2 heads, Qwen's 151,936-token vocabulary by default) and completes a batch of
left-padded prompts of ``--prompt-len`` tokens (lengths vary by up to 8) by exactly
``--new-tokens`` tokens (no stop ids). Reports generated tokens per second (the fastest of
``--repeats`` interleaved runs per method), the ratio to kdtune without the cache measured in the
same run, and whether each method produced the same tokens.

``--temperature T`` samples instead (the whole tempered distribution, as the on-policy recipe's
sampler does without top-k/top-p; each method draws its own tokens, so "same tokens" compares
kdtune's cached and uncached runs, which share a seed). ``--hf-best`` adds transformers with its static cache, and with that cache and its decode step compiled.
The line above the table gives the form kdtune chose for its output head and each form's timing
(`kdtune.generation.generate.output_head`).

    python scripts/bench_generate.py [--batch 8] [--prompt-len 64] [--new-tokens 64] [--device cpu] [--threads N] [--repeats 3] [--hf-best]
"""

import argparse
import importlib
import platform
import tempfile
import time
from pathlib import Path

import torch

from kdtune.checkpointing import load_model, write_random_checkpoint
from kdtune.generation import generate
from kdtune.training.precision import resolve_device, resolve_dtype


def model_config(args) -> dict:
    return {
        "model_type": "qwen2",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": 3 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    }


def timed(fn, new_tokens, device) -> tuple[float, list[list[int]]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    completions = fn(new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, completions


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest is kept")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy; above: sampled from the whole tempered distribution (tokens then differ)")
    parser.add_argument("--hf-best", action="store_true",
                        help="also transformers with its static cache, and with the decode step compiled")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.prompt_len - 8, args.prompt_len + 1, (args.batch,), generator=gen).tolist()
    prompts = [torch.randint(0, args.vocab, (n,), generator=gen).tolist() for n in lengths]
    pad = 0

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(model_config(args), Path(tmp) / "model", seed=0, dtype=dtype)
        model = load_model(ckpt, dtype=dtype, device=device)

        def ours(use_cache):
            def run(new_tokens):
                generator = torch.Generator(device).manual_seed(0) if args.temperature else None
                return generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[], pad_id=pad, use_cache=use_cache,
                                temperature=args.temperature, generator=generator).completions
            return run

        methods = {"kdtune, KV cache": ours(True), "kdtune, no cache": ours(False)}
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
            width = max(lengths)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            attention = (torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]).to(device)

            def hf(**settings):
                def hf_generate(new_tokens):
                    with torch.inference_mode():
                        # sampling: the whole tempered distribution (top_k 0 turns transformers' default 50 off)
                        sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=None) \
                            if args.temperature else dict(do_sample=False, top_k=None, top_p=None, temperature=None)
                        out = hf_model.generate(ids, attention_mask=attention.long(), max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=None,
                                                **sampling, **settings)
                    return out[:, width:].tolist()
                return hf_generate

            name = f"transformers {transformers.__version__} generate"
            methods[name] = hf()
            if args.hf_best:  # its static cache, and that cache with the decode step compiled (on any device)
                methods[name + ", static"] = hf(cache_implementation="static")
                compiled = transformers.CompileConfig()
                compiled._compile_all_devices = True
                methods[name + ", static+compile"] = hf(cache_implementation="static", compile_config=compiled)

        for name, fn in methods.items():  # warm up on a short run (and compile, where a method compiles)
            start = time.perf_counter()
            fn(2)
            print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
        # Then the methods in turn, --repeats times; each keeps its fastest run (this shared
        # machine's speed drifts, and interleaving exposes every method to the same drift).
        results = {}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                seconds, completions = timed(fn, args.new_tokens, device)
                if name not in results or seconds < results[name][0]:
                    results[name] = (seconds, completions)

    tokens = args.batch * args.new_tokens
    decode = importlib.import_module("kdtune.generation.generate")  # the package's `generate` is the function
    for (_, dtype_, shape, rows, threads), seconds in decode._HEADS.items():
        if rows == args.batch and shape[0] == args.vocab:
            per_call = ", ".join(f"{form} {1e3 * s:.2f} ms" for form, s in seconds.items())
            print(f"kdtune's output head, {threads} threads: {decode._cheapest(seconds, args.new_tokens)} for "
                  f"{args.new_tokens} steps (per call: {per_call.replace('setup', 'packing, once')})")
    baseline_seconds = results["kdtune, no cache"][0]
    reference = results["kdtune, no cache"][1]
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; {args.dtype}; {args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}; batch {args.batch}, prompts {min(lengths)}-{max(lengths)} tokens, "
          f"{args.new_tokens} new tokens "
          f"({'sampled at temperature ' + str(args.temperature) if args.temperature else 'greedy'})")
    print(f"| {'method':<50} | {'seconds':>8} | {'tokens/s':>9} | {'vs no cache':>11} | same tokens |")
    print(f"|{'-' * 52}|{'-' * 10}|{'-' * 11}|{'-' * 13}|-------------|")
    for name, (seconds, completions) in results.items():
        same = "yes" if completions == reference else "no"
        speedup = baseline_seconds / seconds
        print(f"| {name:<50} | {seconds:>8.2f} | {tokens / seconds:>9.1f} | {speedup:>10.2f}x | {same:>11} |")


if __name__ == "__main__":
    main()
