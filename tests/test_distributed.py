"""Two CPU processes (gloo, DDP) on halves of a mixed batch give the gradients of one process."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import polypeft as pp
from tiny_models import build, random_batch, randomize_added

SRC = ["de", "fr", "en", "de", "fr", "en", "de", "en"]
TGT = ["en", "en", "de", "fr", "de", "fr", "en", "de"]


def make_model() -> pp.PolyModel:
    poly = pp.wrap(build("bart"), pp.LMSConfig(languages=["en", "de", "fr"], rank=4))
    randomize_added(poly, scale=0.1)
    return poly


def loss_of(model, batch, src, tgt) -> torch.Tensor:
    logits = model(**batch, src_lang=src, tgt_lang=tgt).logits
    return logits.pow(2).mean()


def worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    poly = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(poly)
    batch = random_batch("bart", len(SRC))
    half = len(SRC) // world
    part = slice(rank * half, (rank + 1) * half)
    loss_of(ddp, {k: v[part] for k, v in batch.items()}, SRC[part], TGT[part]).backward()
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in poly.named_parameters() if p.grad is not None}, out_path)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gradients_match_single_process(tmp_path):
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    distributed = torch.load(out_path)
    single = make_model()
    loss_of(single, random_batch("bart", len(SRC)), SRC, TGT).backward()
    expected = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    assert set(distributed) == set(expected)
    lms_names = [n for n in expected if "lms_" in n]
    assert lms_names and all(expected[n].abs().sum() > 0 for n in lms_names)
    for name, grad in expected.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-6, atol=1e-9)
