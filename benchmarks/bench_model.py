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

``--shapes P --epochs E``: batches of varied shape, as fairseq's length-bucketed batching
gives on real data (every batch padded to its longest sequence, so nearly every batch has
a shape of its own). A pool of ``P`` lengths is drawn uniformly from ``[length / 2,
length]``, each with ``tokens-per-batch // n`` sequences; every epoch trains one batch of
each, in a new order, and is timed by the wall clock (synchronised at both ends). The
clustered variants run with the ops' CUDA graph cache on and off
(``FAIRSEQ_CLUSTERED_CUDA_GRAPHS``), from an empty cache: the first epoch pays the
captures (a signature is captured on its second call), later ones replay::

    python3 benchmarks/bench_model.py --lengths 4096,8192 --shapes 24 --epochs 3 \
        --variants sdpa,clustered --csv bench_model_shapes.csv
"""

import argparse
import csv
import os
import random
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


def synthetic_dictionary(vocab_size: int) -> Dictionary:
    """A fairseq dictionary of ``vocab_size`` symbols (its specials and made-up tokens)."""
    dictionary = Dictionary()
    for index in range(vocab_size - len(dictionary)):
        dictionary.add_symbol(f"tok{index}")
    return dictionary


def build_model(variant, max_length, vocab_size, small, num_clusters, topk, attention_dropout=None):
    """A RoBERTa masked LM (base size, or tiny with ``small``) with the given attention.

    ``attention_dropout`` None keeps the architecture's default (0.1 for RoBERTa)."""
    dictionary = synthetic_dictionary(vocab_size)
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
    train_step = trainer(model, device, dtype)
    inputs, masked, targets = random_batch(dictionary, batch, length, torch.Generator(device="cpu").manual_seed(0),
                                           device)

    def step():
        train_step(inputs, masked, targets)

    seconds, peak = time_steps(step, steps, warmup, device, profile_name)
    return batch * length / seconds, peak


def time_steps(step, steps, warmup, device, profile_name=None):
    """Median seconds of ``step()`` over ``steps`` calls after ``warmup`` ones (CUDA events on
    the GPU) and the peak memory in bytes (nan on the CPU); ``profile_name``: also print the
    step's top CUDA kernels under that name."""
    from bench_attention import profile, timer  # benchmarks/ is this script's directory

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:  # the peak of the timed steps, not of the warm-up's first allocations
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = timer(device.type, step, steps, warmup=0) / 1e3
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    if profile_name and cuda:
        profile(profile_name, step, top=40)  # a model step has many kernels besides the attention
    return seconds, peak


def trainer(model, device, dtype):
    """``model`` moved to ``device`` / ``dtype`` in training mode -> ``step(inputs, masked,
    targets)``: forward, masked-LM loss, backward and an SGD update."""
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step(inputs, masked, targets):
        logits, _ = model(inputs, masked_tokens=masked)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def random_batch(dictionary, batch, length, generator, device):
    """Masked-LM inputs, the mask and the targets of ``batch`` random sequences of ``length`` tokens."""
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=generator).to(device)
    masked = (torch.rand(batch, length, generator=generator) < 0.15).to(device)
    return tokens.masked_fill(masked, dictionary.unk()), masked, tokens[masked]  # unk stands in for <mask>


def measure_varied_shapes(model, dictionary, shapes, epochs, device, dtype, seed=0):
    """Tokens/s of each epoch over batches of the given ``(batch, length)`` shapes, one
    batch of each per epoch in a fresh order (wall clock, synchronised at both ends)."""
    train_step = trainer(model, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batches = [random_batch(dictionary, batch, length, generator, device) for batch, length in shapes]
    order = random.Random(seed)
    rates = []
    for _ in range(epochs):
        indices = list(range(len(batches)))
        order.shuffle(indices)
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for index in indices:
            train_step(*batches[index])
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(sum(b * n for b, n in shapes) / (time.perf_counter() - begin))
    return rates


def varied_shapes(length, count, tokens_per_batch, seed=0):
    """``count`` distinct ``(batch, n)`` shapes, n uniform in ``[length // 2, length]``."""
    lengths = random.Random(seed).sample(range(length // 2, length + 1), count)
    return [(max(1, tokens_per_batch // n), n) for n in lengths]


def run_varied_shapes(args, lengths, variants, tokens_per_batch, vocab, small, num_clusters, topk,
                      device, dtype):
    """The ``--shapes`` mode: rows of per-epoch tokens/s, graphs on and off for our variants."""
    from fairseq_clustered.ops.cuda_backend import graph_cache

    rows = []
    for length in lengths:
        shapes = varied_shapes(length, args.shapes, tokens_per_batch)
        for variant in variants:
            ours_on_cuda = variant not in EXACT_VARIANTS and device.type == "cuda"
            for graphs in (("on", "off") if ours_on_cuda else ("",)):
                os.environ["FAIRSEQ_CLUSTERED_CUDA_GRAPHS"] = "0" if graphs == "off" else "1"
                cache = graph_cache() if device.type == "cuda" else None
                if cache is not None:
                    cache.clear()
                    captures_before = cache.captures
                torch.manual_seed(0)
                model, dictionary = build_model(variant, length, vocab, small, num_clusters, topk,
                                                args.attention_dropout)
                rates = measure_varied_shapes(model, dictionary, shapes, args.epochs, device, dtype)
                rows.append({
                    "length": length, "shapes": len(shapes), "variant": variant, "graphs": graphs,
                    **{f"epoch{i + 1}_tokens_per_s": round(rate, 1) for i, rate in enumerate(rates)},
                    "captures": cache.captures - captures_before if cache is not None else "",
                    "graph_cache_mib": round(cache.memory_bytes() / 2**20, 1) if cache is not None else "",
                })
                del model
                if cache is not None:
                    cache.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    os.environ.pop("FAIRSEQ_CLUSTERED_CUDA_GRAPHS", None)
    print(f"{'length':>7} {'shapes':>6} {'variant':>10} {'graphs':>6} "
          + " ".join(f"{'epoch ' + str(i + 1):>10}" for i in range(args.epochs)) + f" {'captures':>8} {'cache MiB':>9}")
    for row in rows:
        rates = [row[f"epoch{i + 1}_tokens_per_s"] for i in range(args.epochs)]
        print(f"{row['length']:>7} {row['shapes']:>6} {row['variant']:>10} {row['graphs']:>6} "
              + " ".join(f"{rate:>10.0f}" for rate in rates) + f" {row['captures']!s:>8} {row['graph_cache_mib']!s:>9}")
    return rows


def add_training_arguments(parser, lengths, variants, csv_path):
    """The options every training benchmark takes (bench_model.py, bench_lm.py)."""
    parser.add_argument("--lengths", default=lengths)
    parser.add_argument("--variants", default=",".join(variants))
    parser.add_argument("--tokens-per-batch", type=int, default=16384,
                        help="batch size = max(1, tokens // length)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--csv", default=csv_path)
    parser.add_argument("--profile", default="", help="comma-separated lengths: print each variant's top CUDA "
                                                      "kernels per training step (GPU)")


def training_setup(args, known_variants):
    """``(device, dtype, lengths, tokens_per_batch, steps, warmup, variants)`` from the options
    of :func:`add_training_arguments`; with ``--cpu-smoke`` the CPU in fp32, lengths 64 and
    128, 256 tokens per batch, 2 steps after 1 warm-up step."""
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        lengths, tokens_per_batch, steps, warmup = [64, 128], 256, 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU, or pass --cpu-smoke")
        device = torch.device("cuda")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        lengths = [int(n) for n in args.lengths.split(",")]
        tokens_per_batch, steps, warmup = args.tokens_per_batch, args.steps, args.warmup
    variants = args.variants.split(",")
    unknown = set(variants) - set(known_variants)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(known_variants)}")
    return device, dtype, lengths, tokens_per_batch, steps, warmup, variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_arguments(parser, "1024,2048,4096,8192,16384", VARIANTS, "bench_model.csv")
    parser.add_argument("--num-clusters", type=int, default=100)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--attention-dropout", type=float, default=None,
                        help="attention dropout of every variant (default: RoBERTa's 0.1)")
    parser.add_argument("--shapes", type=int, default=0,
                        help="train on batches of this many distinct shapes (lengths in [N/2, N]) instead of "
                             "one fixed shape; see the module docstring")
    parser.add_argument("--epochs", type=int, default=3, help="with --shapes: passes over the shapes")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model, lengths 64,128, fp32 on the CPU (checks the script runs)")
    args = parser.parse_args()

    small = args.cpu_smoke
    device, dtype, lengths, tokens_per_batch, steps, warmup, variants = training_setup(args, VARIANTS)
    vocab, num_clusters, topk = (128, 16, 8) if small else (50265, args.num_clusters, args.topk)

    if args.shapes < 0 or args.epochs < 1:
        raise SystemExit(f"--shapes must be >= 0 and --epochs >= 1, got {args.shapes} and {args.epochs}")
    if args.shapes > min(lengths) // 2 + 1:
        raise SystemExit(f"--shapes {args.shapes}: at most {min(lengths) // 2 + 1} distinct lengths fit in "
                         f"[{min(lengths) // 2}, {min(lengths)}]")

    if args.shapes:
        print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
              f"RoBERTa-{'tiny' if small else 'base'} masked LM, C={num_clusters}, k={topk}, {tokens_per_batch} "
              f"tokens/batch, {args.shapes} shapes per length, tokens/s per epoch (wall clock)")
        rows = run_varied_shapes(args, lengths, variants, tokens_per_batch, vocab, small, num_clusters, topk,
                                 device, dtype)
        write_csv(args.csv, rows)
        return

    def measure_variant(variant, length, batch, profile_name):
        model, dictionary = build_model(variant, length, vocab, small, num_clusters, topk, args.attention_dropout)
        result = measure(model, dictionary, length, batch, steps, warmup, device, dtype, profile_name)
        report_graph_cache(f"{variant} at {length}", device)
        return result

    rows = compare_variants(lengths, variants, EXACT_VARIANTS, tokens_per_batch, measure_variant, args.profile,
                            device, dtype)
    report(rows, device, args.csv,
           f"RoBERTa-{'tiny' if small else 'base'} masked LM, C={num_clusters}, k={topk}, {tokens_per_batch} "
           f"tokens/batch, attention dropout "
           f"{'default' if args.attention_dropout is None else args.attention_dropout} (nan = out of memory)")


def report_graph_cache(label, device):
    """One line on what the ops' graph cache did so far (on CUDA with the extension): captures, replays
    and the replays of the C++ entry points (``cuda/clustered_step.cpp``)."""
    from fairseq_clustered.ops.cuda_backend import graph_cache
    cache = graph_cache() if device.type == "cuda" else None
    if cache is not None:
        native = cache.native.replays if cache.native is not None else 0
        print(f"  ({label}: graph cache so far {cache.captures} captures, {cache.replays} replays, {native} of them "
              "from C++)")


def compare_variants(lengths, variants, exact_variants, tokens_per_batch, measure_variant, profile, device, dtype):
    """For each length (batches of ``tokens_per_batch // length`` sequences), each variant's
    ``measure_variant(variant, length, batch, profile_name) -> (tokens/s, peak bytes)``, from
    the same seed, as rows with the ratio to the fastest of ``exact_variants`` at that length
    (out of memory: nan)."""
    rows = []
    for length in lengths:
        batch = max(1, tokens_per_batch // length)
        results = {}
        for variant in variants:
            torch.manual_seed(0)
            profile_name = f"{variant} at {length}" if str(length) in profile.split(",") else None
            try:
                results[variant] = measure_variant(variant, length, batch, profile_name)
            except torch.cuda.OutOfMemoryError:
                results[variant] = (float("nan"), float("nan"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        exact = [results[v][0] for v in exact_variants if v in results and results[v][0] == results[v][0]]
        best_exact = max(exact) if exact else float("nan")
        for variant, (tokens_per_s, peak) in results.items():
            rows.append({
                "length": length, "batch": batch, "variant": variant, "dtype": str(dtype).split(".")[-1],
                "tokens_per_s": round(tokens_per_s, 1),
                "speedup_vs_best_exact": round(tokens_per_s / best_exact, 3) if best_exact == best_exact else "",
                "peak_mem_gib": round(peak / 2**30, 3) if peak == peak else "",
            })
    return rows


def report(rows, device, csv_path, description):
    """The rows of :func:`compare_variants` as a table under a line naming the GPU, torch and
    ``description``, and as a CSV at ``csv_path``."""
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print_rows(rows, f"# {device_name}, torch {torch.__version__}, {description}")
    write_csv(csv_path, rows)


def print_rows(rows, title):
    """The rows of :func:`compare_variants` as a table under ``title``."""
    width = max(10, *(len(row["variant"]) for row in rows))
    print(title)
    print(f"{'length':>7} {'batch':>5} {'variant':>{width}} {'tokens/s':>12} {'vs best exact':>14} {'peak GiB':>9}")
    for row in rows:
        print(f"{row['length']:>7} {row['batch']:>5} {row['variant']:>{width}} {row['tokens_per_s']:>12} "
              f"{row['speedup_vs_best_exact']!s:>14} {row['peak_mem_gib']!s:>9}")


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
