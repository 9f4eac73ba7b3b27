"""Distributed WoodFisher on 2 and 3 gloo processes (CPU) against the single-process run.

Each world size is one spawn of processes that runs every scenario of ``_dist_worker`` (a
spawn costs seconds of imports); the processes write their results and the assertions are
here. "The same gradients": rank 0's reference run reads the ranks' batches one after the
other, which is the rank-major gradient order of the distributed collection. Every spawn is
bounded in time (collectives time out after 120 s, the test after ``LIMIT`` s).
"""
from __future__ import annotations

import json
import os
import socket
import time

import _dist_worker as worker
import pytest
import torch
import torch.multiprocessing as mp

import woodfisher_kernels as wk

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


@pytest.fixture(scope="module")
def suite2(tmp_path_factory):
    return _run_suite(2, tmp_path_factory)


@pytest.fixture(scope="module")
def suite3(tmp_path_factory):
    return _run_suite(3, tmp_path_factory)


def _results(request, world, scenario):
    return _load(request.getfixturevalue(f"suite{world}"), scenario, world)


def _cases(*scenarios):
    return [(w, s) for w in sorted(SUITES) for s in scenarios if s in SUITES[w]]


def _strip(name: str) -> str:
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


@pytest.mark.parametrize("world,scenario", _cases(*COMPARED))
def test_masks_identical_weights_within_roundoff(request, world, scenario):
    runs = _results(request, world, scenario)
    first = runs[0]
    ref_masks = first["ref_masks"]
    masks = {_strip(k): v for k, v in first["masks"].items()}
    assert set(masks) == set(ref_masks)
    for name, keep in ref_masks.items():
        assert torch.equal(masks[name], keep), f"{scenario}: mask of {name} differs in {(masks[name] != keep).sum()}"
    weights = {_strip(k): v for k, v in first["weights"].items()}
    for name, ref in first["ref_weights"].items():
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        assert torch.allclose(weights[name], ref, rtol=0, atol=1e-5 * max(scale, 1e-3)), \
            f"{scenario}: {name} differs by {float((weights[name] - ref).abs().max())}"
    for r, res in enumerate(runs[1:], 1):  # every rank ends with the same model and masks
        for k, v in res["weights"].items():
            assert torch.equal(v, first["weights"][k]), f"{scenario}: rank {r} has other weights in {k}"
        for k, v in res["masks"].items():
            assert torch.equal(v, first["masks"][k])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank (2 GPUs)")
def test_nccl_on_gpus_runs_the_same_code(tmp_path):
    """The NCCL path: the same scenarios, every tensor on the rank's GPU (backend chosen by device)."""
    scenarios = ["mlp_global", "mlp_layerwise", "r20", "ddp"]
    assert _spawn(worker.run_suite, 2, (str(tmp_path), scenarios, "nccl"), LIMIT) == [0, 0]
    for name in scenarios:
        first = _load(str(tmp_path), name, 2)[0]
        masks = {_strip(k): v for k, v in first["masks"].items()}
        for key, keep in first["ref_masks"].items():
            assert torch.equal(masks[key], keep), name


@pytest.mark.parametrize("world,scenario", _cases("cond_lowrank"))
def test_lowrank_refined_blocks_are_counted_as_in_one_process(request, world, scenario):
    """Low-rank blocks whose factor is kept in float64 (woodfisher_kernels.LowRankInverse.refined): the reduced
    count is the single-process one on the same gradients, on every rank."""
    runs = _results(request, world, scenario)
    first = runs[0]
    assert first["refined"] and first["refined"] == first["ref_refined"]
    assert all(res["refined"] == first["refined"] for res in runs[1:])


@pytest.mark.parametrize("world,scenario", _cases("cond_ill", "cond_well"))
def test_kappa_and_refined_are_the_same_on_every_rank_and_as_one_process(request, world, scenario):
    """Each rank checks and recomputes its own blocks; the reduced report is the single-process one, and the
    owned inverses are within the stated bound of float64 (the ill-conditioned blocks at float64 accuracy)."""
    runs = _results(request, world, scenario)
    first = runs[0]
    for res in runs[1:]:
        assert res["kappa"] == first["kappa"] and res["refined"] == first["refined"]
    assert first["refined"] == first["ref_refined"] and bool(first["refined"]) == (scenario == "cond_ill")
    assert set(first["kappa"]) == set(first["ref_kappa"])
    for name, kappa in first["ref_kappa"].items():
        assert first["kappa"][name] == pytest.approx(kappa, rel=1e-5), name
    eps32 = torch.finfo(torch.float32).eps
    for name, grads in first["ref_grads"].items():
        g = grads.double()
        gram = g.transpose(1, 2) @ g / g.shape[1]
        kappa = torch.linalg.eigvalsh(gram)[:, -1] / first["damp"]
        ref = torch.linalg.inv(gram + first["damp"] * torch.eye(gram.shape[-1], dtype=torch.float64))
        got = torch.cat([res["inverses"][name] for res in runs]).double()   # the ranks' ranges, in rank order
        assert [res["range"][name] for res in runs][-1][1] == ref.shape[0]
        err = torch.linalg.matrix_norm(got - ref, ord=2) / torch.linalg.matrix_norm(ref, ord=2)
        assert bool((err <= wk.error_bound(kappa)).all()), name
        beyond = eps32 * kappa > 1.1e-3
        assert bool(beyond.any()) == (scenario == "cond_ill")
        assert not bool(beyond.any()) or float(err[beyond].max()) < 1e-5, name


def test_woodtaylor_matches_single_process(request):
    first = _results(request, 2, "mlp_woodtaylor")[0]
    # the mean loss gradient is summed in another order: masks may differ only at exact near-ties
    agree = sum(int((first["masks"][k] == v).sum()) for k, v in first["ref_masks"].items())
    total = sum(v.numel() for v in first["ref_masks"].values())
    assert agree >= total - 2
    for name, ref in first["ref_weights"].items():
        both = first["masks"].get(name, torch.ones_like(ref, dtype=torch.bool))
        assert torch.allclose(first["weights"][name][both], ref[both], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("world,scenario", _cases("memory_r20", "memory_mlp"))
def test_inverse_memory_per_rank_is_total_over_world(request, world, scenario):
    runs = _results(request, world, scenario)
    total, max_block = runs[0]["total"], runs[0]["max_block"]
    owned = [r["owned"] for r in runs]
    assert sum(owned) == total  # the shards are a partition of the blocks
    assert max(owned) <= total / world + max_block, (owned, total, max_block)


def test_a_rank_may_own_no_block(request):
    runs = _results(request, 3, "memory_small")  # two whole-layer blocks, three ranks
    assert any(sum(r["owned_blocks"].values()) == 0 for r in runs)


def test_two_phase_api_and_layerwise_override(request):
    first = _results(request, 2, "two_phase")[0]
    for sparsity in (0.5, 0.9):
        for name, keep in first[f"ref{sparsity}"].items():
            assert torch.equal(first[sparsity][name], keep)


@pytest.mark.parametrize("world", sorted(SUITES))
def test_distributed_selection_breaks_ties_like_select_masks(request, world):
    for r, res in enumerate(_results(request, world, "ties")):
        for key, value in res.items():
            if key == "seconds":
                continue
            got, ref = value
            for g, e in zip(got, ref):
                assert torch.equal(g, e), f"rank {r}, {key}"


def test_failure_on_one_rank_raises_on_every_rank(request):
    runs = _results(request, 2, "failure")
    for r, res in enumerate(runs):
        assert res["error"] is not None and res["error"][0] == "ValueError", res["error"]
        assert "NaN" in res["error"][1]
        assert res["unchanged"], f"rank {r} changed its model in a failed call"
    assert "rank 1" in runs[0]["error"][1]


# what every rank's message must hold when the ranks' calls differ (scenario "refused" of _dist_worker)
REFUSED = {"sparsity": ["sparsity differs between the ranks", "rank 0: 0.5", "rank 1: 0.6"],
           "seed": ["seed differs between the ranks"],
           "architecture": ["model differs between the ranks", "(9, 12)", "(7, 12)"],
           "weights": ["model differs between the ranks", "'0.weight'"],
           "bad_option_one_rank": ["rank 1", "sparsity must lie in [0, 1), got 1.5"],
           "fsdp_bad_option_one_rank": ["rank 1", "sparsity must lie in [0, 1), got 1.5"],
           "no_loader_one_rank": ["rank 1", "loader is required"],
           "gradual_step": ["step differs between the ranks (from 0 to 1)"],
           "gradual_bad_step_one_rank": ["rank 1", "step must be an int"],
           "same_bad_option": ["inverse_form='offload' needs memory_budget"],
           "fsdp_keep_masks": ["keep_masks=True", "FullyShardedDataParallel"],
           "fsdp_gradual": ["GradualPruner", "FullyShardedDataParallel"],
           "short_loader": ["rank 1", "num_grads=16 over 2 ranks asks rank 1 for 8 gradients", "num_grads <= 8"],
           "short_loader_two_steps": ["rank 1", "8 gradients"],
           "single_pass_one_rank": ["the steps planned", "single-pass loader", "rank 1: [[0.9, 256]]"],
           "prune_with_sparsity": ["sparsity differs between the ranks", "rank 1: 0.6"],
           "with_damp": ["damp differs between the ranks", "rank 0: 0.01", "rank 1: 0.02"]}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_calls_that_differ_between_ranks_raise_valueerror_on_every_rank(request, case):
    """Another option, model or too little data on one rank: a ValueError on every rank naming the argument and
    the rank (not a gloo abort, a hang, or a per-rank share passed off as the call's num_grads); nothing changed."""
    for r, res in enumerate(_results(request, 2, "refused")):
        error, unchanged = res[case]
        assert error is not None and error[0], f"rank {r}: {error}"
        for part in REFUSED[case]:
            assert part in error[1], f"rank {r}: {part!r} not in {error[1]!r}"
        if case == "same_bad_option":  # every rank failed alike: no rank singled out
            assert error[1].startswith("inverse_form="), error[1]
        assert unchanged, f"rank {r} changed its model in a refused call"


def test_a_rank_outside_a_new_group_is_told_so(request):
    """new_group([0]) gives the other ranks GroupMember.NON_GROUP_MEMBER: a ValueError naming group and the rank
    (was: "group must be ... got -100"); rank 0, the group's one member, prunes alone."""
    runs = _results(request, 2, "non_member")
    assert runs[0]["error"] is None
    error = runs[1]["error"]
    assert error is not None and error[0] and "not a member" in error[1] and "rank 1" in error[1], error


def test_one_progress_display_across_ranks(request):
    """progress=True on every rank: rank 0 shows the call's progress, the other ranks nothing (was: one display
    per rank, interleaved)."""
    lead, other = (res["stderr"] for res in _results(request, 2, "progress"))
    assert "Fisher gradients: 8/8" in lead and "selection" in lead and "update" in lead, lead
    assert other == "", other


def test_search_damp_scores_every_ranks_heldout_batches(request):
    """Every rank's held-out loss per damp is the one of a single process on all ranks' batches (float64), so
    every rank chooses the same damp (was: each rank its own held-out loss and its own best damp)."""
    runs = _results(request, 2, "search_damp")
    ref = runs[0]["ref"]
    for r, res in enumerate(runs):
        assert res["losses"].keys() == ref.keys()
        for d, loss in ref.items():
            assert abs(res["losses"][d] - loss) <= 1e-12 * abs(loss), f"rank {r}, damp {d}: {res['losses'][d]} {loss}"


def test_estimate_memory_plans_this_ranks_shard(request):
    """Under a group estimate_memory gives the rank's share and refuses exactly what the call refuses (was: the
    single-process plan, which the sharded call does not follow)."""
    for res in _results(request, 2, "estimate_memory"):
        plain = res["plain"]
        assert plain["plan"] == "sharded" and plain["world_size"] == 2 and plain["refused"] is None
        assert 0 < plain["rank_bytes"] < plain["keep_bytes"]
        below, ran_below = res["below"]
        at, ran_at = res["at"]
        assert below["refused"] is not None and "memory_budget" in below["refused"] and not ran_below
        assert at["refused"] is None and ran_at


def test_every_rank_reading_the_same_samples_is_warned_once(request):
    """Identical loaders on every rank: the Fisher holds each gradient world times; rank 0 warns (was: silent)."""
    lead, other = _results(request, 2, "same_samples")
    assert len(lead["same"]) == 1 and "8 distinct gradients, each 2 times" in lead["same"][0], lead["same"]
    assert lead["own"] == [] and other["same"] == [] and other["own"] == []


def test_a_dying_rank_is_an_error_not_a_hang(tmp_path):
    start = time.monotonic()
    codes = _spawn(worker.run_dying, 2, (str(tmp_path),), 150)
    assert codes == [0, 3], codes
    res = torch.load(os.path.join(tmp_path, "dying.rank0.pt"), weights_only=False)
    assert res["error"] is not None
    assert time.monotonic() - start < 150
    assert not os.path.exists(os.path.join(tmp_path, "dying.rank1.pt"))


def test_cli_prune_under_torchrun_environment(tmp_path):
    """What ``torchrun --nproc-per-node 2 -m woodfisher prune ...`` does: env vars, gloo on the CPU."""
    from woodfisher.checkpoint import save_state_dict
    from woodfisher.data import load_digits
    from woodfisher.demo import train_digits_mlp

    ckpt = str(save_state_dict(train_digits_mlp(load_digits("train"), epochs=2, seed=0), tmp_path / "digits.pt"))
    out = tmp_path / "run"
    out.mkdir()
    assert _spawn(worker.run_cli, 2, (str(out), ckpt), LIMIT) == [0, 0]
    for r in range(2):
        res = torch.load(out / f"cli.rank{r}.pt", weights_only=False)
        assert res == {"code": 0, "initialised_after": False}   # the command made and destroyed its group
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and abs(report["sparsity"] - 0.8) < 1e-3
    masks = torch.load(out / "masks.pt", weights_only=True)
    state = torch.load(out / "pruned.pt", weights_only=True)
    for name, keep in masks.items():
        assert torch.all(state[name][~keep] == 0)


def test_cli_error_under_torchrun_is_printed_once(tmp_path):
    """An option every rank refuses: exit code 2 on every rank, one error line (rank 0's), not one per rank."""
    from woodfisher.checkpoint import save_state_dict
    from woodfisher.models import build_model

    ckpt = str(save_state_dict(build_model("digits_mlp"), tmp_path / "digits.pt"))
    assert _spawn(worker.run_cli_error, 2, (str(tmp_path), ckpt), LIMIT) == [0, 0]
    lead, other = (torch.load(tmp_path / f"cli_error.rank{r}.pt", weights_only=False) for r in range(2))
    assert lead["code"] == other["code"] == 2
    assert lead["stderr"].count("woodfisher: error:") == 1 and "kfac" in lead["stderr"], lead["stderr"]
    assert other["stderr"] == "", other["stderr"]
