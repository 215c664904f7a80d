"""The processes a launcher started, joined as one accelerate state; on a machine without a GPU, as gloo CPU ranks.

accelerate makes each launched process a world of one unless told it runs on CPUs: this tells it, and checks.
"""
from __future__ import annotations

import os

import torch
from accelerate import PartialState


class LaunchError(ValueError):
    """A launch whose processes did not join one group (each would train alone and write over the others)."""


def launched_processes() -> int:
    """How many processes the launcher started (torchrun and `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def needs_cpu_group() -> bool:
    """Several processes and no GPU: accelerate must be asked for a CPU (gloo) group."""
    return launched_processes() > 1 and not (torch.cuda.is_available() or torch.xpu.is_available())


def process_state() -> PartialState:
    """accelerate's state of this process, joined with every process the launcher started."""
    state = PartialState(cpu=True) if needs_cpu_group() else PartialState()
    check_joined(state.num_processes)
    return state


def check_joined(num_processes: int) -> None:
    if num_processes != launched_processes():
        raise LaunchError(
            f"the launcher started {launched_processes()} processes (WORLD_SIZE) but accelerate joined "
            f"{num_processes}: each would train alone and write over the others' run; launch with `accelerate launch "
            "--multi_gpu --num_processes N -m polypeft.cli ...` or `torchrun --nproc_per_node N -m polypeft.cli ...` "
            "(accelerate's --cpu flag starts one process); a script that made accelerate's state itself passes "
            "cpu=True on a machine without a GPU")
