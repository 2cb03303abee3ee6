"""Worker for test_distributed.py: one rank of a 2-process gloo group on the CPU.

`python distributed_worker.py MODE RANK WORLD INIT_FILE OUT_FILE` trains the same small model on
the same global batches as the single-process run in the test, with MODE one of ddp, fsdp2, zero,
dcp, and rank 0 saves the final full parameters (and for dcp the loss of resumed training).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import fused_opt

STEPS, BATCH = 6, 8


def model_fn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 4, generator=g)


def opt_fn(params):
    return fused_opt.AdamW(params, lr=0.01, weight_decay=0.1, l1=0.5, l1_mode="proximal")


def local_loss(model, step, rank, world):
    x, y = batch(step)
    n = BATCH // world
    return torch.nn.functional.mse_loss(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])


def train(model, opt, steps, rank, world):
    for step in steps:
        opt.zero_grad()
        local_loss(model, step, rank, world).backward()
        opt.step()


def full_params(model):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def main(mode, rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = model_fn()
    if mode in ("ddp", "zero"):
        model = torch.nn.parallel.DistributedDataParallel(model)
        if mode == "ddp":
            opt = opt_fn(model.parameters())
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fused_opt.AdamW, lr=0.01,
                                          weight_decay=0.1, l1=0.5, l1_mode="proximal")
        train(model, opt, range(STEPS), rank, world)
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
