"""The benchmarks' shared timing options: which clock, how many torch threads.

``add_arguments(parser, clock=...)`` adds ``--threads`` and ``--clock``; ``configure(args)``
applies them; ``now()`` reads the chosen clock (``cpu``: this process's CPU time, robust to
other load on the machine; ``wall``: elapsed time).
"""

from __future__ import annotations

import argparse
import time

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_chosen = [time.perf_counter]


def add_arguments(parser: argparse.ArgumentParser, clock: str = "wall") -> None:
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=clock)


def configure(args: argparse.Namespace) -> None:
    _chosen[0] = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)


def now() -> float:
    return _chosen[0]()
