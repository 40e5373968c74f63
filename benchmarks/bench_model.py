"""Training throughput and peak memory of a RoBERTa-base-sized masked LM, by attention.

Variants (same model, same weights' shapes, same inputs):

* ``fairseq``: fairseq's own ``MultiheadAttention`` (``--clustered-attention full``);
* ``sdpa``: exact attention through ``torch.nn.functional.scaled_dot_product_attention``
  with PyTorch's default backend choice (no mask: all sequences have the same length);
* ``clustered`` / ``improved``: this plugin (C=100, 10 iterations, 63 bits, k=32 by default).

One training step = forward, masked-LM loss on 15% of the tokens (fairseq's
``masked_lm`` criterion computes the LM head on masked tokens only), backward and
an SGD update, with the model in fp16 as fairseq's ``--fp16`` runs it (fp32 master
weights and loss scaling add the same cost to every variant, so they are left out).
Each (variant, length) is timed over ``--steps`` steps after ``--warmup`` steps with
CUDA events; the table shows the median tokens per second, the ratio to the fastest
exact variant at that length and the peak memory. A CSV is written.

GPU (with fairseq carried there: ``source benchmarks/gpu_fairseq_env.sh``)::

    python3 benchmarks/bench_model.py --lengths 1024,2048,4096,8192,16384 --csv bench_model.csv

CPU smoke run (tiny model, fp32)::

    .venv/bin/python benchmarks/bench_model.py --cpu-smoke
"""

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq.data import Dictionary  # noqa: E402

from fairseq_clustered.models.clustered_roberta import (  # noqa: E402
    ClusteredRobertaEncoder,
    clustered_roberta_base_architecture,
)
from fairseq_clustered.modules import ClusteredMultiheadAttention  # noqa: E402

VARIANTS = ("fairseq", "sdpa", "clustered", "improved")
EXACT_VARIANTS = ("fairseq", "sdpa")


class SDPASelfAttention(ClusteredMultiheadAttention):
    """Exact self-attention through ``scaled_dot_product_attention`` (benchmark baseline only)."""

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None,
                need_weights=True, static_kv=False, attn_mask=None, before_softmax=False,
                need_head_weights=False):
        length, batch, embed_dim = query.shape
        q, k, v = (self._split_heads(proj(query)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        mask = None if key_padding_mask is None else ~key_padding_mask.bool()[:, None, None, :]
        dropout_p = self.dropout_module.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, embed_dim)), None


def build_model(variant, max_length, vocab_size, small, num_clusters, topk, attention_dropout=None):
    """A RoBERTa masked LM (base size, or tiny with ``small``) with the given attention.

    ``attention_dropout`` None keeps the architecture's default (0.1 for RoBERTa)."""
    dictionary = Dictionary()
    for index in range(vocab_size - len(dictionary)):
        dictionary.add_symbol(f"tok{index}")
    args = argparse.Namespace(
        clustered_attention="full" if variant in EXACT_VARIANTS else variant,
        clustered_num_clusters=num_clusters, clustered_topk=topk,
        max_positions=max_length, tokens_per_sample=max_length,
    )
    if attention_dropout is not None:
        args.attention_dropout = attention_dropout
    if small:
        args.encoder_layers, args.encoder_embed_dim = 2, 64
        args.encoder_ffn_embed_dim, args.encoder_attention_heads = 128, 4
    clustered_roberta_base_architecture(args)
    model = ClusteredRobertaEncoder(args, dictionary)
    if variant == "sdpa":
        for layer in model.sentence_encoder.layers:
            exact = layer.self_attn
            sdpa = SDPASelfAttention(exact.embed_dim, exact.num_heads, dropout=exact.dropout_module.p,
                                     self_attention=True, attention="full")
            sdpa.load_state_dict(exact.state_dict())
            layer.self_attn = sdpa
    return model, dictionary


def measure(model, dictionary, length, batch, steps, warmup, device, dtype, profile_name=None):
    """Median tokens/s and peak memory (bytes) of training steps on random tokens.

    ``profile_name``: also print the step's top CUDA kernels under that name."""
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=generator).to(device)
    masked = (torch.rand(batch, length, generator=generator) < 0.15).to(device)
    targets = tokens[masked]
    inputs = tokens.masked_fill(masked, dictionary.unk())  # stands in for <mask>

    def step():
        logits, _ = model(inputs, masked_tokens=masked)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    if profile_name and cuda:
        from bench_attention import profile  # benchmarks/ is this script's directory
        profile(profile_name, step)
    return batch * length / statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens-per-batch", type=int, default=16384,
                        help="batch size = max(1, tokens // length)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-clusters", type=int, default=100)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--attention-dropout", type=float, default=None,
                        help="attention dropout of every variant (default: RoBERTa's 0.1)")
    parser.add_argument("--csv", default="bench_model.csv")
    parser.add_argument("--profile", default="", help="comma-separated lengths: print each variant's top CUDA "
                                                      "kernels per training step (GPU)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model, lengths 64,128, fp32 on the CPU (checks the script runs)")
    args = parser.parse_args()

    small = args.cpu_smoke
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        lengths, tokens_per_batch, vocab = [64, 128], 256, 128
        num_clusters, topk, steps, warmup = 16, 8, 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU, or pass --cpu-smoke")
        device = torch.device("cuda")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        lengths = [int(n) for n in args.lengths.split(",")]
        tokens_per_batch, vocab = args.tokens_per_batch, 50265
        num_clusters, topk, steps, warmup = args.num_clusters, args.topk, args.steps, args.warmup
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    rows = []
    for length in lengths:
        batch = max(1, tokens_per_batch // length)
        results = {}
        for variant in variants:
            torch.manual_seed(0)
            model, dictionary = build_model(variant, length, vocab, small, num_clusters, topk,
                                            args.attention_dropout)
            try:
                profile_name = f"{variant} at {length}" if str(length) in args.profile.split(",") else None
                results[variant] = measure(model, dictionary, length, batch, steps, warmup, device, dtype,
                                           profile_name)
            except torch.cuda.OutOfMemoryError:
                results[variant] = (float("nan"), float("nan"))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        exact = [results[v][0] for v in EXACT_VARIANTS if v in results and results[v][0] == results[v][0]]
        best_exact = max(exact) if exact else float("nan")
        for variant, (tokens_per_s, peak) in results.items():
            rows.append({
                "length": length, "batch": batch, "variant": variant, "dtype": str(dtype).split(".")[-1],
                "tokens_per_s": round(tokens_per_s, 1),
                "speedup_vs_best_exact": round(tokens_per_s / best_exact, 3) if best_exact == best_exact else "",
                "peak_mem_gib": round(peak / 2**30, 3) if peak == peak else "",
            })

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {device_name}, torch {torch.__version__}, RoBERTa-{'tiny' if small else 'base'} masked LM, "
          f"C={num_clusters}, k={topk}, {tokens_per_batch} tokens/batch, attention dropout "
          f"{'default' if args.attention_dropout is None else args.attention_dropout} (nan = out of memory)")
    header = f"{'length':>7} {'batch':>5} {'variant':>10} {'tokens/s':>12} {'vs best exact':>14} {'peak GiB':>9}"
    print(header)
    for row in rows:
        print(f"{row['length']:>7} {row['batch']:>5} {row['variant']:>10} {row['tokens_per_s']:>12} "
              f"{row['speedup_vs_best_exact']!s:>14} {row['peak_mem_gib']!s:>9}")
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
