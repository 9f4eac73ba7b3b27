"""A training loop whose steps pass a scheduled pruning step, buffers a forward writes, and the messages for inputs
in other pruning tools' forms (per-weight sparsity dicts, module objects, a QAT model)."""
from __future__ import annotations

import warnings

import pytest
import torch
from _pruner_shared import tiny_data, tiny_mlp
from torch import nn

import woodfisher as wf

SCHEDULE = dict(final_sparsity=0.8, start_step=0, end_step=4, frequency=1, initial_sparsity=0.2)


def _pruner(model, data):
    return wf.GradualPruner(model, data, **SCHEDULE, num_grads=8, damp=1e-2, progress=False)


def _zeros(model):
    weights = [model[0].weight.detach().double(), model[2].weight.detach().double()]
    return sum(float((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_a_loop_that_passes_scheduled_steps_catches_up_with_a_warning():
    model, data = tiny_mlp(seed=0), tiny_data(seed=0)
    pruner = _pruner(model, data)
    assert pruner.step(0) is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pruner.step(3)  # 1 and 2 were never called, 3 is scheduled: pruned to its sparsity, no notice
    assert res is not None and not any("past the scheduled" in str(w.message) for w in caught)
    assert pruner.history[-1]["target"] == pytest.approx(wf.polynomial_sparsity(3, **SCHEDULE))
    with pytest.warns(UserWarning, match=r"step\(7\) is past the scheduled pruning step 4"):
        res = pruner.step(7)  # past the end, with step 4 not called: the final sparsity
    want = wf.polynomial_sparsity(4, **SCHEDULE)
    assert want == pytest.approx(0.8)
    assert pruner.history[-1]["target"] == pytest.approx(want)
    assert res.sparsity == pytest.approx(_zeros(model), abs=1e-12)
    assert abs(_zeros(model) - 0.8) <= 1.0 / (model[0].weight.numel() + model[2].weight.numel())
    assert pruner.step(4) is None and pruner.step(8) is None  # done: nothing more, also for an earlier step


def test_a_run_resumed_past_the_last_scheduled_step_reaches_the_final_sparsity():
    model, data = tiny_mlp(seed=0), tiny_data(seed=0)
    pruner = _pruner(model, data)
    pruner.step(0)
    pruner.step(1)
    other = tiny_mlp(seed=5)
    resumed = _pruner(other, data)
    resumed.load_state_dict(pruner.state_dict())
    other.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"step\(6\) is past the scheduled pruning step 4"):
        assert resumed.step(6) is not None  # the checkpoint's run stopped at 1, this one resumes at 6
    assert resumed.history[-1]["target"] == pytest.approx(0.8)
    assert abs(_zeros(other) - 0.8) <= 1.0 / (other[0].weight.numel() + other[2].weight.numel())
    assert resumed.step(2) is None


class _Counting(nn.Module):
    """Writes its buffers on every forward, in place and by assignment, whatever the train/eval flag."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("last", torch.zeros(width))

    def forward(self, x):
        with torch.no_grad():
            self.calls += 1
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
            self.last = x.detach()[0].clone()
        return x


def _counting_model():
    """A small MLP with a :class:`_Counting` layer after one forward, and its buffers (object, value) as they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), _Counting(8), nn.ReLU(), nn.Linear(8, 3))
    model(torch.randn(4, 6))
    return model, {name: (buf, buf.clone()) for name, buf in model[1].named_buffers()}


def _assert_kept(counting, before):
    for name, (buf, value) in before.items():
        assert getattr(counting, name) is buf and torch.equal(buf, value), name


@pytest.mark.parametrize("method", ["woodfisher", "diag_fisher", "kfac"])
def test_buffers_a_forward_writes_are_as_they_were_after_pruning(method):
    model, before = _counting_model()
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap cannot trace the in-place writes: the one-sample loop, with a notice
        wf.prune_one_shot(model, data, sparsity=0.5, method=method, num_grads=16, progress=False)
        wf.estimate_curvature(model, data, method=method, num_grads=16, progress=False)
    _assert_kept(model[1], before)


@pytest.mark.parametrize("criterion,train_mode", [("snip", False), ("snip", True), ("hutchinson", False),
                                                   ("fisher", False)])
def test_pai_scoring_passes_leave_the_buffers_a_forward_writes(criterion, train_mode):
    from woodfisher.pai import prune_at_init

    model, before = _counting_model()
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_at_init(model, data, sparsity=0.5, criterion=criterion, train_mode=train_mode, num_probes=2,
                      progress=False)
    _assert_kept(model[1], before)


def test_a_per_weight_sparsity_dict_prunes_each_weight_and_module_objects_say_their_names():
    model, data = tiny_mlp(seed=0), tiny_data(seed=0)
    result = wf.prune_one_shot(model, data, sparsity={"0": 0.9, "2": 0.5}, num_grads=16, progress=False)
    assert [round(row["sparsity"] * row["numel"]) for row in result.layers] == [round(0.9 * 30), round(0.5 * 20)]
    from woodfisher.pai import prune_at_init
    model = tiny_mlp(seed=0)
    with pytest.raises(ValueError, match=r"sparsity must be a number .*dict.*are the sparsity of "
                                         r"prune_one_shot.*sparsity takes one number"):
        prune_at_init(model, data, sparsity={"0": 0.9}, criterion="magnitude", progress=False)
    with pytest.raises(ValueError, match=r"got tensor\(0.5000\) \(a tensor: pass float"):
        wf.prune_one_shot(model, data, sparsity=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"modules .*named_modules\(\) if mod is layer"):
        wf.prune_one_shot(model, data, sparsity=0.5, modules=[model[0]])


def test_a_qat_model_refusal_does_not_suggest_the_weights_it_refuses():
    import torch.ao.quantization as tq

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(model, inplace=True)
    with pytest.raises(ValueError, match="no prunable module") as info:
        wf.prune_one_shot(model, tiny_data(seed=0), sparsity=0.5, progress=False)
    message = str(info.value)
    assert "can be named" not in message and "['0.weight', '2.weight'] cannot be pruned" in message
    assert "prepare_qat" in message
    with pytest.raises(ValueError, match="prepare_qat"):
        wf.prune_one_shot(model, tiny_data(seed=0), sparsity=0.5, modules=["0"], progress=False)


def test_a_schedule_below_the_zeros_a_model_brings_says_so_in_the_schedules_terms():
    import torch.nn.utils.prune as prune

    model, data = tiny_mlp(seed=0), tiny_data(seed=0)
    prune.global_unstructured([(model[0], "weight"), (model[2], "weight")], pruning_method=prune.L1Unstructured,
                              amount=0.5)
    pruner = _pruner(model, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pruner.step(0)  # the schedule starts at 0.2, the model holds 0.5
    messages = [str(w.message) for w in caught]
    assert res.sparsity == pytest.approx(_zeros(model), abs=1e-12) and res.sparsity == pytest.approx(0.5, abs=0.03)
    assert any(m.startswith("step(0): the schedule's sparsity 0.2 is below") and "initial_sparsity=" in m
               for m in messages)
    assert not any("pass sparsity >=" in m for m in messages)


def test_a_percentage_sparsity_is_refused_with_the_fraction():
    model, data = tiny_mlp(seed=0), tiny_data(seed=0)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\), got 80 \(a fraction: sparsity=0.8 for 80%\)"):
        wf.prune_one_shot(model, data, sparsity=80)
    with pytest.raises(ValueError, match=r"final_sparsity must lie in \[0, 1\), got 90 \(a fraction: final_sparsity"):
        wf.GradualPruner(model, data, final_sparsity=90)


def test_gradual_pruner_refuses_keep_masks_false_which_it_could_not_honour():
    model, data = tiny_mlp(seed=0), tiny_data(seed=0)
    with pytest.raises(ValueError, match=r"keep_masks=False: GradualPruner always holds the masks.*make_permanent"):
        wf.GradualPruner(model, data, final_sparsity=0.5, keep_masks=False)
    assert not hasattr(model[0], "weight_mask")
    wf.GradualPruner(model, data, final_sparsity=0.5, keep_masks=True, num_grads=8, progress=False).step(0)
    assert hasattr(model[0], "weight_mask")


def test_flops_counting_passes_leave_the_buffers_a_forward_writes():
    from woodfisher.flops import count_flops

    model, before = _counting_model()
    count_flops(model, (6,))
    wf.layer_flops_per_param(model, tiny_data(seed=0, classes=3), wf.resolve_targets(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf.prune_one_shot(model, [(x.float(), y) for x, y in tiny_data(seed=0, classes=3)], sparsity=0.5, beta=1.0,
                          num_grads=16, progress=False)
    _assert_kept(model[1], before)


def test_bn_recalibration_changes_the_batchnorm_statistics_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), _Counting(8), nn.ReLU(), nn.Linear(8, 3))
    model(torch.randn(4, 6))
    counting, bn = model[2], model[1]
    before = {name: (buf, buf.clone()) for name, buf in counting.named_buffers()}
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    assert wf.recalibrate_bn(model, data, num_batches=3) == 24
    _assert_kept(counting, before)
    hidden = torch.cat([model[0](x) for x, _ in data]).detach().double()  # the cumulative average of the batches
    assert torch.allclose(bn.running_mean.double(), hidden.mean(0), atol=1e-6)
    assert int(bn.num_batches_tracked) == 3


def test_torch_export_programs_and_their_modules_are_refused_with_the_order_to_follow():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    program = torch.export.export(model, (torch.randn(2, 6),))
    data = [(x.float(), y) for x, y in tiny_data(seed=0, classes=3)]
    with pytest.raises(ValueError, match="got ExportedProgram: prune the nn.Module before torch.export"):
        wf.prune_one_shot(program, data, sparsity=0.5)
    exported = program.module()
    with pytest.raises(ValueError, match=r"torch.export module .*prune the nn.Module, then export"):
        wf.prune_one_shot(exported, data, sparsity=0.5, modules=["0.weight"])
    with pytest.raises(ValueError, match=r"torch.export module"):
        wf.GradualPruner(exported, data, final_sparsity=0.5)


def test_a_quantized_model_is_told_to_prune_before_quantizing():
    import torch.ao.quantization as tq

    model = tq.quantize_dynamic(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), {nn.Linear},
                                dtype=torch.qint8)
    with pytest.raises(ValueError, match="no prunable module.*prune the float model before quantizing it"):
        wf.prune_one_shot(model, tiny_data(seed=0), sparsity=0.5, progress=False)


def test_sparseml_style_names_are_answered_in_this_packages_terms():
    model = tiny_mlp(seed=0)
    with pytest.raises(ValueError, match=r"'re:.\*0.\*' .*regular expression.*re.fullmatch"):
        wf.prune_one_shot(model, None, method="global_magnitude", sparsity=0.5, modules=["re:.*0.*"])
    with pytest.raises(ValueError, match=r"'__ALL_PRUNABLE__' is no name here: every prunable weight is modules=None"):
        wf.prune_one_shot(model, None, method="global_magnitude", sparsity=0.5, modules=["__ALL_PRUNABLE__"])
