"""Worker for test_distributed.py: one rank of a 2-process gloo group on the CPU.

`python distributed_worker.py MODE RANK WORLD INIT_FILE OUT_FILE` trains the same small model on
the same global batches as the single-process run in the test, with MODE one of ddp, fsdp2, zero,
dcp, ddp-sparse (an nn.Embedding(sparse=True) whose sparse grads DDP all-reduces, stepped by SGD),
and rank 0 saves the final full parameters.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import fused_opt

STEPS, BATCH = 6, 8


VOCAB = 64


class EmbeddingMLP(torch.nn.Module):
    """Token rows of a sparse-grad embedding, averaged, plus the dense features, into an MLP."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, 12, sparse=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def forward(self, x, tokens):
        return self.mlp(x + self.embedding(tokens).mean(1))


def model_fn(mode="ddp"):
    torch.manual_seed(0)
    if mode == "ddp-sparse":
        return EmbeddingMLP()
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    # Few tokens per sample: the ranks' sparse grads hold different rows, some the same.
    return torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 4, generator=g), \
        torch.randint(0, VOCAB, (BATCH, 2), generator=g)


def opt_fn(params, mode="ddp"):
    if mode == "ddp-sparse":  # sparse grads take no weight decay or L1 (as torch.optim.SGD)
        return fused_opt.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    return fused_opt.AdamW(params, lr=0.01, weight_decay=0.1, l1=0.5, l1_mode="proximal")


def local_loss(model, step, rank, world, mode="ddp"):
    x, y, tokens = batch(step)
    n = BATCH // world
    mine = slice(rank * n, (rank + 1) * n)
    out = model(x[mine], tokens[mine]) if mode == "ddp-sparse" else model(x[mine])
    return torch.nn.functional.mse_loss(out, y[mine])


def train(model, opt, steps, rank, world, mode="ddp"):
    for step in steps:
        opt.zero_grad()
        local_loss(model, step, rank, world, mode).backward()
        if mode == "ddp-sparse":  # (DDP all-reduces it as a sparse tensor: SGD must take it so)
            assert opt.param_groups[0]["params"][0].grad.is_sparse
        opt.step()


def full_params(model):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def main(mode, rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = model_fn(mode)
    if mode in ("ddp", "zero", "ddp-sparse"):
        model = torch.nn.parallel.DistributedDataParallel(model)
        if mode != "zero":
            opt = opt_fn(model.parameters(), mode)
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fused_opt.AdamW, lr=0.01,
                                          weight_decay=0.1, l1=0.5, l1_mode="proximal")
        train(model, opt, range(STEPS), rank, world, mode)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = opt_fn(model.parameters())
        if mode == "fsdp2":
            train(model, opt, range(STEPS), rank, world)
        else:  # dcp: train half, save with torch.distributed.checkpoint, load into fresh objects, go on
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
            train(model, opt, range(STEPS // 2), rank, world)
            model_sd, optim_sd = get_state_dict(model, opt)
            ckpt = out_file + ".dcp"
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
            model2 = model_fn()
            for layer in model2:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model2, mesh=mesh)
            opt2 = opt_fn(model2.parameters())
            model_sd2, optim_sd2 = get_state_dict(model2, opt2)
            state = {"model": model_sd2, "optim": optim_sd2}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
            model = model2
            train(model, opt2, range(STEPS // 2, STEPS), rank, world)
    params = full_params(model)
    if rank == 0:
        torch.save(params, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    # Every result is written and the group is destroyed; skip interpreter teardown, where gloo's
    # worker threads rarely abort the process ("terminate called without an active exception",
    # once in a CI run of the dcp mode) after the work is done.
    sys.stdout.flush()
    os._exit(0)
