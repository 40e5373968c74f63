"""What attention dropout costs the causal clustered op on the GPU.

Forward+backward of ``causal_clustered_attention`` (its defaults: window 256, 64 clusters)
at B = 4, H = 8, D = 64, bf16, N = 4k and 32k, with ``dropout_p`` 0 and 0.1 (the keep-mask
drawn from a CUDA generator each step, as a model's training forward does); median of 10
CUDA-event-timed steps after 3 warm-up steps::

    python3 benchmarks/causal_dropout_cost.py
"""

import torch

from bench_attention import timer  # benchmarks/ is this script's directory
from fairseq_clustered.ops import causal_clustered_attention


def main():
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this measures the GPU path")
    torch.manual_seed(0)
    planes = torch.randn(63, 64, device="cuda")
    for n in (4096, 32768):
        q, k, v = (torch.randn(4, 8, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)
        for p in (0.0, 0.1):
            gen = torch.Generator("cuda").manual_seed(0)

            def step():
                for t in (q, k, v):
                    t.grad = None
                causal_clustered_attention(q, k, v, planes=planes, dropout_p=p, generator=gen).backward(g)

            print(f"N={n} dropout={p}: fwd+bwd {timer('cuda', step, repeats=10, warmup=3):.3f} ms", flush=True)


if __name__ == "__main__":
    main()
