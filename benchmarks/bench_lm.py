"""Training throughput and peak memory of a GPT-sized causal language model, by attention.

Variants (same decoder, same weights' shapes, same inputs; ``clustered_transformer_lm_gpt``:
12 layers, 768 wide, 12 heads of 64, a vocabulary of 50304 tokens: GPT-2's 50257 padded to a
multiple of 64, as GPT training code does, since with an odd vocabulary cuBLAS runs the
output layer on slow unaligned kernels: 32 of 87 ms of a clustered step at 16k on an H200):

* ``full``: fairseq's own ``MultiheadAttention`` with its ``(T, T)`` future mask
  (``--clustered-causal-attention full``);
* ``sdpa``: exact causal attention through
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` with PyTorch's default
  backend choice, and no future mask built;
* ``causal_clustered``: this plugin's leak-free causal clustered attention (by default the
  library's window and clusters, ``--window`` / ``--num-clusters`` to change them).

The architecture's attention dropout of 0.1 is set to 0 for every variant by default
(``--attention-dropout P`` sets another: with dropout the causal clustered op draws and
reads a keep-mask of one byte per query and softmax column, which costs it about as much
as the attention itself; ``benchmarks/causal_dropout_cost.py``). One training step = forward, next-token cross-entropy
over every position, backward and an SGD update, in fp16 as fairseq's ``--fp16`` runs it
(as in ``bench_model.py``, whose timing and table this script shares). Each (variant,
length) is timed over ``--steps`` steps after ``--warmup`` steps with CUDA events; the
table shows the median tokens per second, the ratio to the fastest exact variant at that
length and the peak memory, and a CSV is written.

GPU (with fairseq carried there: ``source benchmarks/gpu_fairseq_env.sh``)::

    python3 benchmarks/bench_lm.py --lengths 2048,4096,8192,16384 --csv bench_lm.csv

CPU smoke run (tiny model, fp32)::

    .venv/bin/python benchmarks/bench_lm.py --cpu-smoke
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import (  # noqa: E402
    add_training_arguments, compare_variants, report, synthetic_dictionary, time_steps, training_setup)
from fairseq.models.transformer_lm import base_lm_architecture, transformer_lm_gpt  # noqa: E402

from fairseq_clustered.models.clustered_lm import ClusteredCausalTransformerDecoder  # noqa: E402
from fairseq_clustered.modules.causal_attention import CausalClusteredMultiheadAttention  # noqa: E402
from fairseq_clustered.ops import causal as causal_ops  # noqa: E402

VARIANTS = ("full", "sdpa", "causal_clustered")
EXACT_VARIANTS = ("full", "sdpa")


class SDPACausalSelfAttention(CausalClusteredMultiheadAttention):
    """Exact causal self-attention through ``scaled_dot_product_attention(is_causal=True)``
    (benchmark baseline only). Its ``attention`` reads ``'sdpa'``, not ``'full'``, so the
    decoder builds no ``(T, T)`` future mask, which ``is_causal`` does not need."""

    def __init__(self, embed_dim, num_heads, dropout=0.0):
        super().__init__(embed_dim, num_heads, dropout=dropout, self_attention=True, attention="full")
        self.attention = "sdpa"

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        if key_padding_mask is not None or incremental_state is not None:
            raise ValueError("the SDPA baseline takes whole, unpadded sequences")
        length, batch, embed_dim = query.shape
        q, k, v = (self._split_heads(proj(query)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        dropout_p = self.dropout_module.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, embed_dim)), None


def build_decoder(variant, length, vocab_size, small, window, num_clusters, attention_dropout=0.0):
    """The decoder of a ``clustered_transformer_lm_gpt`` (or a tiny one with ``small``) with
    the given attention and attention dropout, contexts of ``length`` tokens."""
    dictionary = synthetic_dictionary(vocab_size)
    args = argparse.Namespace(
        clustered_causal_attention="full" if variant in EXACT_VARIANTS else variant,
        clustered_window=window, clustered_num_clusters=num_clusters,
        tokens_per_sample=length, max_target_positions=length, seed=1,
    )
    if small:
        args.decoder_layers, args.decoder_embed_dim, args.decoder_ffn_embed_dim = 2, 64, 128
        args.decoder_attention_heads = 4
        base_lm_architecture(args)
    else:
        transformer_lm_gpt(args)
    args.attention_dropout = attention_dropout
    embed_tokens = torch.nn.Embedding(len(dictionary), args.decoder_input_dim, dictionary.pad())
    decoder = ClusteredCausalTransformerDecoder(args, dictionary, embed_tokens, no_encoder_attn=True)
    if variant == "sdpa":
        for layer in decoder.layers:
            exact = layer.self_attn
            sdpa = SDPACausalSelfAttention(exact.embed_dim, exact.num_heads, dropout=exact.dropout_module.p)
            sdpa.load_state_dict(exact.state_dict())
            layer.self_attn = sdpa
    return decoder, dictionary


def measure(decoder, dictionary, length, batch, steps, warmup, device, dtype, profile_name=None):
    """Median tokens/s and peak memory (bytes) of training steps on random tokens."""
    decoder = decoder.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.SGD(decoder.parameters(), lr=1e-4)
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens, targets = (torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=generator)
                       .to(device) for _ in range(2))

    def step():
        logits, _ = decoder(tokens)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds, peak = time_steps(step, steps, warmup, device, profile_name)
    return batch * length / seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_training_arguments(parser, "2048,4096,8192,16384", VARIANTS, "bench_lm.csv")
    parser.add_argument("--window", type=int, default=causal_ops.DEFAULT_WINDOW)
    parser.add_argument("--num-clusters", type=int, default=causal_ops.DEFAULT_NUM_CLUSTERS)
    parser.add_argument("--vocab", type=int, default=50304,
                        help="vocabulary size (default GPT-2's, padded to a multiple of 64)")
    parser.add_argument("--attention-dropout", type=float, default=0.0,
                        help="attention dropout of every variant (default 0; GPT's is 0.1)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model, lengths 64,128, window 16, 8 clusters, fp32 on the CPU "
                             "(checks the script runs)")
    args = parser.parse_args()

    small = args.cpu_smoke
    device, dtype, lengths, tokens_per_batch, steps, warmup, variants = training_setup(args, VARIANTS)
    vocab, window, num_clusters = (128, 16, 8) if small else (args.vocab, args.window, args.num_clusters)

    def measure_variant(variant, length, batch, profile_name):
        decoder, dictionary = build_decoder(variant, length, vocab, small, window, num_clusters,
                                            args.attention_dropout)
        return measure(decoder, dictionary, length, batch, steps, warmup, device, dtype, profile_name)

    rows = compare_variants(lengths, variants, EXACT_VARIANTS, tokens_per_batch, measure_variant, args.profile,
                            device, dtype)
    report(rows, device, args.csv,
           f"GPT-{'tiny' if small else 'small'} causal LM, window {window}, C={num_clusters}, vocabulary {vocab}, "
           f"{tokens_per_batch} tokens/batch, attention dropout {args.attention_dropout} (nan = out of memory)")


if __name__ == "__main__":
    main()
