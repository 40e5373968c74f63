"""The attention module under torch's DistributedDataParallel, on the CPU (gloo, 2 processes).

fairseq's distributed training wraps the model in DDP; the GPU run of
benchmarks/distributed_train.sh covers NCCL. Here, without a GPU: every rank draws the same
training hash planes at every step (seeded by the model seed and the layer index), and the
gradients DDP averages over two ranks equal those of one process over both halves.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("fairseq", reason="fairseq is not installed")

from fairseq_clustered import ops  # noqa: E402
from fairseq_clustered.modules import ClusteredMultiheadAttention  # noqa: E402

EMBED, HEADS, LENGTH, BATCH = 32, 4, 40, 4  # 4 sequences: 2 per rank


def make_module(attention):
    torch.manual_seed(0)
    return ClusteredMultiheadAttention(EMBED, HEADS, self_attention=True, attention=attention, num_clusters=5,
                                       iterations=3, topk=4, seed=7, layer_index=1)


def batch_and_weights():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(LENGTH, BATCH, EMBED, generator=gen), torch.randn(LENGTH, BATCH, EMBED, generator=gen)


def loss_of(module, x, weights):
    out, _ = module(x, x, x, need_weights=False)
    return (out * weights).sum() / BATCH


def rank_main(rank, world, init_file, attention, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module = make_module(attention)
        # Training mode: the planes each rank draws at its first two steps (as the forward does).
        generator = module._training_generator(torch.device("cpu"))
        planes = torch.stack([ops.draw_hash_planes(module.bits, module.head_dim, generator) for _ in range(2)])
        gathered = [torch.empty_like(planes) for _ in range(world)]
        dist.all_gather(gathered, planes)
        # Gradients through DDP (eval mode: fixed planes, no dropout), each rank its half.
        ddp = torch.nn.parallel.DistributedDataParallel(module.eval())
        x, weights = batch_and_weights()
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        # Each rank's loss is its half's share of the full-batch mean, times world: DDP averages.
        (loss_of(ddp, x[:, half], weights[:, half]) * world).backward()
        if rank == 0:  # (a file: tensors sent through a queue die with the process that sent them)
            torch.save((torch.stack(gathered), {n: p.grad for n, p in module.named_parameters()}), result_file)
        del ddp
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()
    # Leave without running C++ static destructors: at interpreter exit a gloo thread now
    # and then aborted the process ("terminate called without an active exception", about
    # 1 run in 10 on the CI machine) after the test's work was done and checked in.
    os._exit(0)


@pytest.mark.parametrize("attention", ["clustered", "improved"])
def test_ddp_on_two_cpu_ranks(tmp_path, attention):
    mp.start_processes(rank_main, args=(2, tmp_path / "init", attention, tmp_path / "rank0.pt"), nprocs=2,
                       join=True, start_method="spawn")
    planes, ddp_grads = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(planes[0], planes[1]), "the ranks drew different training hash planes"

    module = make_module(attention).eval()
    x, weights = batch_and_weights()
    loss_of(module, x, weights).backward()
    for name, param in module.named_parameters():
        torch.testing.assert_close(ddp_grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
