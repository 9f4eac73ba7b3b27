"""Running the gloo scenarios of ``_dist_worker`` / ``_dist_cases`` for the distributed tests.

Each world size is one spawn of processes that runs every scenario (a spawn costs seconds of
imports), once per test session (the ``suite2`` / ``suite3`` fixtures of conftest.py); the
processes write their results, the test modules load them. Every spawn is bounded in time
(collectives time out after 120 s, the run after ``LIMIT`` s).
"""
from __future__ import annotations

import os
import socket
import time

import _dist_worker as worker
import pytest
import torch
import torch.multiprocessing as mp

LIMIT = 420
COMPARED = ["mlp_global", "mlp_joint", "mlp_layerwise", "mlp_whole_layers", "mlp_two_steps_diag", "r20", "ddp", "fsdp",
            "empty_shard", "with_damp", "with_damp_lowrank", "nm", "rows", "rows_layerwise"]
SUITES = {2: COMPARED + ["mlp_woodtaylor", "memory_r20", "memory_mlp", "two_phase", "ties", "failure", "refused",
                         "non_member", "progress", "search_damp", "estimate_memory", "same_samples", "cond_ill",
                         "cond_well", "cond_lowrank"],
          3: ["mlp_global", "mlp_whole_layers", "r20", "empty_shard", "memory_r20", "memory_mlp", "memory_small",
              "ties", "cond_ill", "cond_well", "rows"]}
PREFIXES = ("_fsdp_wrapped_module.", "module.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, args, limit):
    """Run fn(rank, world, port, *args) in ``world`` processes; fail the test after ``limit`` s.

    Plain processes (not torch's spawn context, which kills the others when one exits: the
    test of a dying rank needs the survivors to run on), forked from a forkserver that
    imported everything once (each fresh interpreter would spend seconds importing torch).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["_dist_worker"])  # torch, woodfisher, torch._dynamo imported once
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(rank, world, port, *args), daemon=True) for rank in range(world)]
    # the forkserver starts with the first process: one thread per process, and the tests
    # directory on its path (Python 3.11's forkserver ignores the parent's sys.path)
    env = {"OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if alive:
        pytest.fail(f"distributed run did not finish within {limit} s (a hang)")
    return [p.exitcode for p in procs]


def _load(out, name, world):
    runs = [torch.load(os.path.join(out, f"{name}.rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(runs):
        assert "crash" not in res, f"rank {r} crashed in {name}:\n{res['crash']}"
    return runs


def _run_suite(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"dist{world}"))
    codes = _spawn(worker.run_suite, world, (out, SUITES[world]), LIMIT)
    assert codes == [0] * world, f"exit codes {codes}"
    return out


def _results(request, world, scenario):
    return _load(request.getfixturevalue(f"suite{world}"), scenario, world)
