"""Two CPU processes (gloo; DDP and FSDP2) give what one process gives: gradients on halves of a mixed batch
(also when a language is absent on one rank), whole adapter saves, and the training loop's schedule."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import polypeft as pp
from tiny_models import build, random_batch, randomize_added

pytestmark = pytest.mark.slow  # every test here takes many seconds

SRC = ["de", "fr", "en", "de", "fr", "en", "de", "en"]
TGT = ["en", "en", "de", "fr", "de", "fr", "en", "de"]


LANGS = ["en", "de", "fr"]


def make_model() -> pp.PolyModel:
    poly = pp.wrap(build("bart"), pp.LMSConfig(languages=LANGS, rank=4))
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


# Rank 1's half holds no "fr" at all: its gradient for fr's factors is zero, yet DDP must still sync them.
SRC_FR_ON_ONE_RANK = ["de", "fr", "fr", "de", "de", "en", "de", "en"]
TGT_FR_ON_ONE_RANK = ["en", "de", "en", "fr", "en", "de", "en", "de"]


def sharded_worker(rank: int, world: int, port: int, out_dir: str, wrapper: str) -> None:
    """Half of the batch per rank under `wrapper` ("fsdp": FSDP2 fully_shard, "ddp"); rank 0 writes the whole
    gradients, and under FSDP every rank saves the adapter (the gather is collective)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    poly = make_model()
    src, tgt = (SRC, TGT) if wrapper == "fsdp" else (SRC_FR_ON_ONE_RANK, TGT_FR_ON_ONE_RANK)
    if wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(poly)
    else:
        model = torch.nn.parallel.DistributedDataParallel(poly)
    batch = random_batch("bart", len(src))
    half = len(src) // world
    part = slice(rank * half, (rank + 1) * half)
    loss_of(model, {k: v[part] for k, v in batch.items()}, src[part], tgt[part]).backward()
    grads = {n: p.grad for n, p in poly.named_parameters() if p.grad is not None}
    if wrapper == "fsdp":
        grads = {n: g.full_tensor() for n, g in grads.items()}  # collective: every rank gathers
        poly.save_pretrained(os.path.join(out_dir, f"adapter{rank}"))
    if rank == 0:
        torch.save({n: g.clone() for n, g in grads.items()}, os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


def single_process_grads(src: list[str], tgt: list[str]) -> dict[str, torch.Tensor]:
    single = make_model()
    loss_of(single, random_batch("bart", len(src)), src, tgt).backward()
    return {n: p.grad for n, p in single.named_parameters() if p.grad is not None}


def assert_grads_match(distributed: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(distributed) == set(expected)
    lms_names = [n for n in expected if "lms_" in n]
    assert lms_names and all(expected[n].abs().sum() > 0 for n in lms_names)
    for name, grad in expected.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-6, atol=1e-9)


def test_fsdp2_gradients_match_single_process_and_the_adapter_save_holds_every_shard(tmp_path):
    mp.spawn(sharded_worker, args=(2, free_port(), str(tmp_path), "fsdp"), nprocs=2, join=True)
    assert_grads_match(torch.load(tmp_path / "grads.pt"), single_process_grads(SRC, TGT))
    reference = make_model()
    batch = random_batch("bart", len(SRC))
    for rank in (0, 1):
        loaded = pp.PolyModel.from_pretrained(build("bart"), tmp_path / f"adapter{rank}")
        # 3 routes on 2 ranks: rank 0 holds rows 0-1 and rank 1 row 2 of every factor; the save has all three.
        for key, value in loaded.added_state_dict().items():
            torch.testing.assert_close(value, reference.added_state_dict()[key], rtol=0, atol=0)
        torch.testing.assert_close(loss_of(loaded, batch, SRC, TGT), loss_of(reference, batch, SRC, TGT))


def test_ddp_syncs_a_language_absent_on_one_rank(tmp_path):
    mp.spawn(sharded_worker, args=(2, free_port(), str(tmp_path), "ddp"), nprocs=2, join=True)
    expected = single_process_grads(SRC_FR_ON_ONE_RANK, TGT_FR_ON_ONE_RANK)
    fr = LANGS.index("fr")
    assert all(g[fr].abs().sum() > 0 for n, g in expected.items() if "lms_" in n), "fr must have gradients"
    assert_grads_match(torch.load(tmp_path / "grads.pt"), expected)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gradients_match_single_process(tmp_path):
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    assert_grads_match(torch.load(out_path), single_process_grads(SRC, TGT))


def train_lms(run_dir: str, accumulation: int = 1) -> list[float]:
    """A few steps of polypeft's loop on a tiny LMS model; the learning rate of every step."""
    from polypeft.training.loop import TrainSettings, train

    poly = make_model()

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(3, 60, (4, 6), generator=generator)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def loss_fn(model, batch):
        return model(**batch, src_lang="de", tgt_lang="en").loss, int(batch["labels"].numel())

    settings = TrainSettings(steps=6, lr=1e-3, warmup=4, accumulation=accumulation, checkpoint_every=3)
    history = train(poly, batches, loss_fn, settings, run_dir)["history"]
    return [record["lr"] for record in history]


def train_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    rates = train_lms(run_dir)
    assert AcceleratorState().num_processes == world, "accelerate did not start a 2-process gloo group"
    torch.save(rates, os.path.join(run_dir, f"rates{rank}.pt"))


def test_training_loop_on_two_processes_keeps_the_single_process_schedule(tmp_path):
    mp.spawn(train_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = train_lms(str(tmp_path / "single"))
    from polypeft.training.loop import inverse_sqrt

    assert single == pytest.approx([1e-3 * inverse_sqrt(4)(k) for k in range(1, 7)])  # warm-up 4, then 1/sqrt
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rates{rank}.pt") == pytest.approx(single)
    # gradient accumulation: the schedule moves once per optimiser step, not once per micro-batch
    assert train_lms(str(tmp_path / "accumulated"), accumulation=2) == pytest.approx(single)


def test_a_launch_whose_processes_do_not_join_is_refused(monkeypatch):
    from polypeft.training.processes import LaunchError, check_joined, needs_cpu_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert needs_cpu_group() == (not torch.cuda.is_available())
    with pytest.raises(LaunchError, match=r"started 2 processes \(WORLD_SIZE\) but accelerate joined 1.*--cpu flag"):
        check_joined(1)
    check_joined(2)


README = Path(__file__).resolve().parents[1] / "README.md"
TINY_RECIPE = dict(name="lms", languages=["en", "de"], vocab_size=600, spm_max_sentences=600, max_train_verses=150,
                   max_eval_verses=6, method={"name": "lms", "rank": 2}, batching="mixed", steps=4, warmup=2,
                   checkpoint_every=2, valid_every=0, max_tokens=512, beam=2)


def documented_launches() -> list[str]:
    """The README's two-process training commands, as written there."""
    lines = [line.split("#")[0].strip() for line in README.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if re.match(r"(accelerate launch|torchrun) .*-m polypeft\.cli mmt train ", line)]


def tiny_recipe_and_env(tmp_path: Path) -> tuple[Path, dict]:
    """TINY_RECIPE as a file, and an environment whose cache and runs lie under `tmp_path`."""
    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "output_dir": str(tmp_path / "runs")}))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "POLYPEFT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(pp.__file__).parents[1])}
    return recipe, env


@pytest.mark.slow
def test_a_two_process_build_follows_one_decision(tmp_path):
    """`mmt build` under torchrun: the first process decides under the folder's lock and both follow, so a finished
    build is reused by both and a build another command holds is refused by both (none waits at a barrier)."""
    from filelock import FileLock

    from polypeft.tasks.translation.cached import cached_recipe, lock_file
    from polypeft.tasks.translation.run import MMTRecipe

    recipe, env = tiny_recipe_and_env(tmp_path)
    build = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "polypeft.cli", "mmt",
             "build", str(recipe)]
    weights = cached_recipe(MMTRecipe.from_yaml(recipe), tmp_path / "cache" / "translation").run_dir / "model.safetensors"
    written = []
    for attempt in ("trains", "reuses"):
        done = subprocess.run(build, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{attempt}\n{done.stderr[-3000:]}"
        assert f"built: {weights.parent}" in done.stdout
        written.append(weights.stat().st_mtime_ns)
    assert written[0] == written[1], "the finished build is reused, not trained again"
    other_seed = cached_recipe(replace(MMTRecipe.from_yaml(recipe), seed=1), tmp_path / "cache" / "translation")
    with FileLock(lock_file(other_seed.run_dir)):
        done = subprocess.run(build + ["--seed", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # each process says so (torchrun shows every process's stderr) and exits at once
    assert f"error: another command is building {other_seed.run_dir}" in done.stderr, done.stderr[-3000:]
    assert not other_seed.run_dir.exists()


@pytest.mark.slow
def test_the_readme_launch_commands_train_on_two_processes(tmp_path):
    """The documented commands themselves, on the Bible corpus at tiny size: every logged step says 2 processes."""
    commands = documented_launches()
    assert [c.split()[0] for c in commands] == ["accelerate", "torchrun"], commands
    recipe, env = tiny_recipe_and_env(tmp_path)
    prepare = subprocess.run([sys.executable, "-m", "polypeft.cli", "mmt", "prepare", str(recipe)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert prepare.returncode == 0, prepare.stderr[-2000:]
    for number, command in enumerate(commands):
        command = command.replace("configs/mmt_demo.yaml", f"{recipe} --set name=run{number}")
        done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        log = [json.loads(line) for line in (tmp_path / "runs" / f"run{number}-seed0" / "train_log.jsonl").open()]
        assert [record["processes"] for record in log] == [2, 2, 2, 2], command
