"""Pruning inside a training loop: the caller's autocast / inference_mode, copies of masked models (EMA)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from _pruner_shared import tiny_data, tiny_mlp
from test_finetune import Net
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import woodfisher as wf
import woodfisher_kernels as wk
from woodfisher.state import DeepcopyDetached

OPTIONS = dict(num_grads=16, block_size=8, num_steps=2, progress=False)


def _float_setup(seed=0):
    model = tiny_mlp(seed, sizes=(6, 8, 4)).float()
    loader = [(x.float(), y) for x, y in tiny_data(n=32)]
    return model, loader


def _masks_equal(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("context", ["autocast", "inference_mode", "no_grad"])
def test_prune_one_shot_inside_a_loop_context_equals_outside(context):
    """A call made inside the loop's ``torch.autocast`` / ``inference_mode`` / ``no_grad`` gives the masks and
    weights of the same call outside it (autocast would take the Fisher from bfloat16 forwards)."""
    ref, loader = _float_setup()
    res_ref = wf.prune_one_shot(ref, loader, sparsity=0.6, **OPTIONS)
    model, _ = _float_setup()
    enter = {"autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16), "inference_mode": torch.inference_mode,
             "no_grad": torch.no_grad}[context]
    with enter():
        res = wf.prune_one_shot(model, loader, sparsity=0.6, keep_masks=True, **OPTIONS)
    assert _masks_equal(res.masks, res_ref.masks)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    assert not any(b.is_inference() for b in model.buffers())  # masks usable by autograd
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in loader:  # trains afterwards (an inference-tensor mask raised here), masks held
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    wf.make_permanent(model)
    for name, keep in res.masks.items():
        assert not dict(model.named_parameters())[name][~keep].any()


def test_curvature_and_prune_with_under_autocast_equal_outside():
    ref, loader = _float_setup()
    res_ref = wf.prune_with(ref, wf.estimate_curvature(ref, loader, **OPTIONS), 0.5)
    model, _ = _float_setup()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        curv = wf.estimate_curvature(model, loader, **OPTIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = wf.prune_with(model, curv, 0.5)
    assert _masks_equal(res.masks, res_ref.masks)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_gradual_pruner_and_hook_under_inference_mode_then_train():
    """Steps taken (and a FisherHook built) under ``inference_mode``: training goes on, the masks hold."""
    model, loader = _float_setup()
    pruner = wf.GradualPruner(model, loader, final_sparsity=0.7, start_step=0, end_step=2, frequency=1, **OPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    with torch.inference_mode():
        hook = wf.FisherHook(model, num_grads=4, damp=1e-3, block_size=8, buffer=2).attach(opt)
    for step in range(3):
        with torch.inference_mode():
            pruner.step(step)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert hook.ready and not any(v.is_inference() for v in hook.inverses.values())
    masks = pruner.masks()
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * total)
    with torch.inference_mode():
        wf.make_permanent(model)
    assert not any(p.is_inference() for p in model.parameters())
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert not params[name][~keep].any() and params[name][keep].all()


def test_deepcopy_of_a_masked_model_after_forward():
    """``copy.deepcopy`` works after a forward pass with gradients; the copy is independent and keeps its masks."""
    model = Net().double()
    loader = tiny_data(n=16)
    wf.prune_one_shot(model, loader, sparsity=0.5, keep_masks=True, num_grads=16, progress=False)
    F.cross_entropy(model(loader[0][0]), loader[0][1]).backward()
    twin = copy.deepcopy(model)
    for module in twin.modules():
        copier = module.__dict__.get("__deepcopy__")
        assert copier is None or (isinstance(copier, DeepcopyDetached) and copier.module is module)
    x = loader[1][0]
    assert torch.equal(twin(x), model(x))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(twin(xb), yb).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the original is untouched
    twin(x)
    for (name, mod), (_, mod2) in zip(model.named_modules(), twin.named_modules()):
        if hasattr(mod, "weight_mask"):
            assert torch.equal(mod.weight_mask, mod2.weight_mask) and not mod2.weight[mod2.weight_mask == 0].any()
    wf.make_permanent(twin)
    assert not any("__deepcopy__" in m.__dict__ for m in twin.modules())
    copy.deepcopy(model)  # the original still copies


def test_ema_of_a_gradually_pruned_model():
    """The EMA (AveragedModel) of a model under gradual pruning: built once the masks are attached, its
    parameters are the running average of the model's (float64 reference by hand) and its zeros the masks'."""
    model, loader = tiny_mlp(0, sizes=(6, 8, 4)), tiny_data(n=32)
    pruner = wf.GradualPruner(model, loader, final_sparsity=0.6, start_step=1, end_step=3, frequency=2, **OPTIONS)
    wf.attach_masks(model, pruner.masks())  # the masks' buffers exist from here on, as the EMA copies them
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    F.cross_entropy(model(loader[0][0]), loader[0][1]).backward()  # a forward with gradients before the copy
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    ref = None
    for step in range(5):
        pruner.step(step)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        ema.update_parameters(model)
        params = [p.detach().clone() for p in model.parameters()]  # the first update copies them
        ref = params if ref is None else [0.8 * r + 0.2 * p for r, p in zip(ref, params)]
    for p, r in zip(ema.module.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    x = loader[0][0]
    ema(x)
    masks = pruner.masks()
    assert 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == pytest.approx(
        0.6, abs=0.02)
    wf.make_permanent(ema.module)
    params = dict(ema.module.named_parameters())
    for name, keep in masks.items():
        assert not params[name][~keep].any()


def test_fisher_hook_reads_gradients_after_masks_are_attached_mid_window():
    """Masks attached while a window is open (no reset): the hook still reads the weights' gradients (the
    Parameter is now ``weight_orig``; ``module.weight`` a derived tensor with no ``.grad``), not zeros."""
    model, loader = tiny_mlp(0, sizes=(6, 8, 4)), tiny_data(n=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = wf.FisherHook(model, num_grads=8, damp=1e-2, block_size=8, buffer=3).attach(opt)
    params = dict(model.named_parameters())
    names = [t.name for t in hook.targets]
    seen = {name: [] for name in names}
    for step in range(8):
        if step == 3:
            wf.attach_masks(model, {name: params[name].detach().abs() > 0.2 for name in names})
        x, y = loader[step % len(loader)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name in names:
            seen[name].append((params[name].grad * hook.keep[name]).reshape(-1).clone())
        opt.step()
    assert hook.ready
    curv = hook.curvature()
    for target in hook.targets:
        grads = torch.stack(seen[target.name])
        assert grads[3:].abs().sum() > 0
        ref = wk.fisher_inverse(target.grad_blocks(grads.double()), 1e-2, 8, backend="torch")
        err = (curv.inverses[target.name].double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (target.name, float(err))


@pytest.mark.parametrize("saved,resumed", [("dp", "plain"), ("plain", "compile"), ("compile", "dp")])
def test_gradual_state_resumes_through_another_wrapper(saved, resumed):
    """A pruner state saved from a DataParallel / torch.compile / plain model resumes on the same weights wrapped
    otherwise (its ``module.`` / ``_orig_mod.`` names matched to this model's): same masks, same schedule."""
    wrap = {"plain": lambda m: m, "dp": torch.nn.DataParallel,
            "compile": lambda m: torch.compile(m, backend="eager")}
    loader = tiny_data(n=32)
    first = wrap[saved](tiny_mlp(0, sizes=(6, 8, 4)))
    pruner = wf.GradualPruner(first, loader, final_sparsity=0.7, start_step=0, end_step=2, frequency=1, **OPTIONS)
    pruner.step(0)
    pruner.step(1)
    state = pruner.state_dict()
    inner = tiny_mlp(1, sizes=(6, 8, 4))
    again = wf.GradualPruner(wrap[resumed](inner), loader, final_sparsity=0.7, start_step=0, end_step=2, frequency=1,
                             **OPTIONS)
    again.load_state_dict(state)
    assert again.last_step == 1 and again.step(1) is None
    saved_masks = {strip: state["masks"][name]
                   for name, strip in wf.targets.strip_wrapper_prefixes(state["masks"]).items()}
    ours = again.masks()
    assert {strip: ours[name] for name, strip in wf.targets.strip_wrapper_prefixes(ours).items()}.keys() == \
        saved_masks.keys()
    for name, strip in wf.targets.strip_wrapper_prefixes(ours).items():
        assert torch.equal(ours[name], saved_masks[strip])
    assert again.step(2).sparsity == pytest.approx(0.7, abs=0.02)


def test_gradual_state_of_other_weights_is_still_refused():
    loader = tiny_data(n=32)
    pruner = wf.GradualPruner(tiny_mlp(0, sizes=(6, 8, 4)), loader, final_sparsity=0.7, start_step=0, end_step=2,
                              frequency=1, **OPTIONS)
    pruner.step(0)
    state = pruner.state_dict()
    state["masks"] = {"module." + k.replace("0.", "9."): v for k, v in state["masks"].items()}
    other = wf.GradualPruner(tiny_mlp(0, sizes=(6, 8, 4)), loader, final_sparsity=0.7, start_step=0, end_step=2,
                             frequency=1, **OPTIONS)
    with pytest.raises(ValueError, match="state holds masks for"):
        other.load_state_dict(state)
    assert other.last_step is None and not any(hasattr(m, "weight_mask") for m in other.model.modules())


def test_schedule_starts_exactly_at_initial_sparsity():
    """s_f + (s_i - s_f) * 1 rounds (0.5 + (0.05 - 0.5) = 0.04999999999999999): the first step's target is s_i."""
    for final, initial in [(0.5, 0.05), (0.8, 0.3), (0.9, 0.1)]:
        assert wf.polynomial_sparsity(4, final_sparsity=final, start_step=4, end_step=10, frequency=2,
                                      initial_sparsity=initial) == initial
        assert wf.polynomial_sparsity(11, final_sparsity=final, start_step=4, end_step=10, frequency=2,
                                      initial_sparsity=initial) == final


def test_gradual_nm_pattern_is_checked_at_construction():
    """An N:M pattern fixes every step's sparsity: a ramp, or weights whose rows it does not fit, are refused by
    the constructor (naming the pattern), not at the first step in the middle of training."""
    model, loader = tiny_mlp(0, sizes=(8, 8, 4)), tiny_data(n=32, features=8)
    with pytest.raises(ValueError, match=r"pattern='2:4' fixes the sparsity of every pruning step at 0.5.*"
                                         r"initial_sparsity=0.05"):
        wf.GradualPruner(model, loader, final_sparsity=0.5, pattern="2:4", start_step=0, end_step=4, frequency=2)
    odd = tiny_mlp(0, sizes=(6, 8, 4))
    with pytest.raises(ValueError, match="rows of 6 entries, not a multiple of 4"):
        wf.GradualPruner(odd, loader, final_sparsity=0.5, pattern="2:4", start_step=1, end_step=1,
                         modules=[t.name for t in wf.resolve_targets(odd)])
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    for kw in (dict(start_step=1, end_step=1), dict(initial_sparsity=0.5, start_step=0, end_step=2, frequency=1)):
        net = tiny_mlp(0, sizes=(8, 8, 4))
        pruner = wf.GradualPruner(net, loader, final_sparsity=0.5, pattern="2:4", **kw, num_grads=16, progress=False)
        for step in range(3):
            pruner.step(step)
        for name, keep in pruner.masks().items():
            assert (keep.reshape(-1, 4).sum(1) == 2).all(), name


def _hook_run(model, loader, hook, opt, steps):
    for step in steps:
        x, y = loader[step % len(loader)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_fisher_hook_state_resumes_mid_window_in_a_fresh_hook():
    """A window saved mid-way (inverses, buffered gradients, counts) and loaded into a new model / optimizer /
    hook continues exactly as the uninterrupted run: same inverses, same curvature, same pruning."""
    loader = tiny_data(n=32)

    def setup():
        model = tiny_mlp(0, sizes=(6, 8, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, wf.FisherHook(model, num_grads=10, damp=1e-2, block_size=8, buffer=4).attach(opt)

    model, opt, hook = setup()
    _hook_run(model, loader, hook, opt, range(10))
    full_inverses = {k: v.clone() for k, v in hook.curvature().inverses.items()}
    full_kappa = dict(hook.curvature().kappa)
    full = wf.prune_with(model, hook.curvature(), 0.5)
    full_params = [p.detach().clone() for p in model.parameters()]
    model, opt, hook = setup()
    _hook_run(model, loader, hook, opt, range(6))  # 4 folded, 2 buffered
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "hook": hook.state_dict()})
    _hook_run(model, loader, hook, opt, range(6, 8))  # the saved state is a copy, not the live window
    assert saved["hook"]["count"] == 6 and len(saved["hook"]["pending"]) == 2
    model, opt, hook = setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    hook.load_state_dict(saved["hook"])
    _hook_run(model, loader, hook, opt, range(6, 10))
    assert hook.count == 10 and hook.steps == 10
    for name, inv in hook.curvature().inverses.items():
        assert torch.equal(inv, full_inverses[name]), name
    assert hook.curvature().kappa == full_kappa  # the conditioning bound continues too
    resumed = wf.prune_with(model, hook.curvature(), 0.5)
    assert _masks_equal(resumed.masks, full.masks)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), full_params))


def test_fisher_hook_state_of_other_settings_or_weights_is_refused():
    model = tiny_mlp(0, sizes=(6, 8, 4))
    state = wf.FisherHook(model, num_grads=10, damp=1e-2, block_size=8).state_dict()
    other = wf.FisherHook(model, num_grads=10, damp=1e-3, block_size=8)
    with pytest.raises(ValueError, match="other settings.*damp"):
        other.load_state_dict(state)
    bigger = wf.FisherHook(tiny_mlp(0, sizes=(6, 9, 4)), num_grads=10, damp=1e-2, block_size=8)
    before = {k: v.clone() for k, v in bigger.inverses.items()}
    with pytest.raises(ValueError, match=r"state\['inverses'\] holds"):
        bigger.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in bigger.inverses.items()) and bigger.count == 0
    with pytest.raises(ValueError, match="not a FisherHook state_dict"):
        other.load_state_dict({"settings": 1})


def test_ema_with_averaged_buffers_is_made_sparse_again_by_attach_masks():
    """``AveragedModel(use_buffers=True)`` averages the masks too (fractions: a dense EMA); re-attaching the
    model's masks gives the EMA exactly those zeros and leaves its kept weights as averaged."""
    model, loader = tiny_mlp(0, sizes=(6, 8, 4)), tiny_data(n=32)
    pruner = wf.GradualPruner(model, loader, final_sparsity=0.6, start_step=1, end_step=3, frequency=2, **OPTIONS)
    wf.attach_masks(model, pruner.masks())
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    for step in range(5):
        pruner.step(step)
        _hook_run(model, loader, None, opt, range(4))
        ema.update_parameters(model)
    masks = pruner.masks()
    inner = dict(ema.module.named_modules())
    assert any(((inner[n.rsplit(".", 1)[0]].weight_mask > 0) & ~m).any() for n, m in masks.items())  # averaged
    kept = {n: (dict(ema.module.named_parameters())[n + "_orig"].detach() * m) for n, m in masks.items()}
    wf.attach_masks(ema.module, masks)
    ema(loader[0][0])
    for name, keep in masks.items():
        module = inner[name.rsplit(".", 1)[0]]
        assert torch.equal(module.weight_mask.bool(), keep) and torch.equal(module.weight, kept[name])


def test_gradual_loader_checked_at_construction():
    """A loader the steps could not read (not iterable; single-pass with several pruning steps) is refused when
    the pruner is built, naming ``loader``, not at a pruning step hours into training."""
    loader = tiny_data(n=32)
    with pytest.raises(ValueError, match="loader must be an iterable"):
        wf.GradualPruner(tiny_mlp(0), 5, final_sparsity=0.5)
    with pytest.raises(ValueError, match="loader: a single-pass iterable"):
        wf.GradualPruner(tiny_mlp(0), iter(loader), final_sparsity=0.5, start_step=0, end_step=2)
    model = tiny_mlp(0)
    pruner = wf.GradualPruner(model, iter(loader), final_sparsity=0.5, start_step=3, end_step=3, num_grads=16,
                              progress=False)  # one step: one pass is enough
    assert pruner.step(3).sparsity == pytest.approx(0.5, abs=0.03)
    pruner = wf.GradualPruner(tiny_mlp(0), None, final_sparsity=0.5, start_step=0, end_step=1, **OPTIONS)
    assert pruner.step(0, loader).sparsity == pytest.approx(0.05, abs=0.03)  # a loader per step
