"""Collective calls whose ranks differ (options, model, data, steps) or that every rank must take alike
(progress, notes and errors printed once, search_damp's choice, estimate_memory's shard), on 2 gloo
processes: the scenarios of ``_dist_cases``, run once per session (``suite2`` of conftest.py)."""
from __future__ import annotations

import _dist_cases as cases
import pytest
import torch
from _dist_harness import LIMIT, _results, _spawn

# what every rank's message must hold when the ranks' calls differ (scenario "refused" of _dist_cases)
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


def test_cli_error_under_torchrun_is_printed_once(tmp_path):
    """An option every rank refuses: exit code 2 on every rank, one error line (rank 0's), not one per rank."""
    from woodfisher.checkpoint import save_state_dict
    from woodfisher.models import build_model

    ckpt = str(save_state_dict(build_model("digits_mlp"), tmp_path / "digits.pt"))
    assert _spawn(cases.run_cli_error, 2, (str(tmp_path), ckpt), LIMIT) == [0, 0]
    lead, other = (torch.load(tmp_path / f"cli_error.rank{r}.pt", weights_only=False) for r in range(2))
    assert lead["code"] == other["code"] == 2
    assert lead["stderr"].count("woodfisher: error:") == 1 and "kfac" in lead["stderr"], lead["stderr"]
    assert other["stderr"] == "", other["stderr"]
