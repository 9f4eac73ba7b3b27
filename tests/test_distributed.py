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
import time

import _dist_worker as worker
import pytest
import torch
from _dist_harness import COMPARED, LIMIT, PREFIXES, SUITES, _load, _results, _spawn

import woodfisher_kernels as wk


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
