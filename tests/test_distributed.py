"""DDP (also with an nn.Embedding(sparse=True)), FSDP2 (fully_shard, DTensor params and states),
ZeroRedundancyOptimizer and torch.distributed.checkpoint with fused_opt, on 2 CPU processes
(gloo): each must end with the same params as one process training on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import distributed_worker as w

WORLD = 2


def single_process(mode):
    model = w.model_fn(mode)
    opt = w.opt_fn(model.parameters(), mode)
    w.train(model, opt, range(w.STEPS), rank=0, world=1, mode=mode)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "zero", "dcp", "ddp-sparse"])
def test_distributed_matches_single_process(mode, tmp_path):
    init, out = str(tmp_path / "init"), str(tmp_path / "params.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, os.path.join(here, "distributed_worker.py"), mode, str(rank),
                               str(WORLD), init, out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(WORLD)]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    expected = single_process(mode)
    got = torch.load(out, weights_only=True)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if mode == "ddp-sparse":  # the embedding rows no token picked are where they started
        unused = torch.ones(w.VOCAB, dtype=torch.bool)
        unused[torch.cat([w.batch(step)[2].flatten() for step in range(w.STEPS)])] = False
        assert unused.any() and (~unused).any()
        torch.testing.assert_close(got[0][unused], w.model_fn(mode).embedding.weight.detach()[unused], rtol=0, atol=0)
        assert not torch.equal(got[0][~unused], w.model_fn(mode).embedding.weight.detach()[~unused])
    else:
        assert any((p == 0).any() for p in got), "the proximal L1 term should have zeroed some weights"
