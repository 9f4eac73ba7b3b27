"""The Fisher fed from the training loop: running block inverses from the optimizer's gradients.

M-FAC's "dynamic" use of the inverse Fisher: the gradients a training loop computes anyway
are the Fisher's gradients, so gradual pruning needs no extra pass over the data.
:class:`FisherHook` reads the gradients of the pruned weights before each optimizer step
(``optimizer.register_step_pre_hook``; or call :meth:`FisherHook.observe` yourself), buffers
``buffer`` of them and folds them into running dense block inverses with one
:func:`woodfisher_kernels.woodbury_update_` launch (paper Eq. 2, k rank-one updates at once):

    F^-1 <- (F + G_k^T G_k / N)^-1,   starting from I / damp,

so after N gradients it holds exactly ``(damp I + (1/N) sum_i g_i g_i^T)^-1`` blockwise, the
inverse :func:`woodfisher.estimate_curvature` builds from the same N gradients. Each
gradient is the mini-batch mean gradient of one step (the "fisher mini-batch" is the
training batch). :meth:`FisherHook.curvature` hands the inverses to
:func:`woodfisher.prune_with`; call :meth:`FisherHook.reset` after pruning (or whenever the
masks or the weights' parametrisation change) to start a new window.

:meth:`FisherHook.state_dict` / :meth:`FisherHook.load_state_dict` carry an open window
across a checkpoint (a resumed run folds in the same gradients as an uninterrupted one).

With DDP the gradients are already averaged over ranks, so every rank holds the same
inverses. Weights already pruned when the window starts get zero gradients (they stay out
of the Fisher, as in :mod:`woodfisher.gradients`).
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
from torch import nn

import woodfisher_kernels as wk

from .conditioning import EPS32, WARN_LEVEL
from .config import PruneConfig, check_int, pattern_fixed_sparsity
from .curvature import Curvature
from .damping import FisherStats, check_damp, live_coordinates
from .diagnostics import warn_at_caller, warnings_held
from .precision import compute_dtype
from .state import caller_modes_off
from .structured import fit_pattern
from .targets import resolve_targets

__all__ = ["FisherHook"]


class FisherHook:
    """Running blockwise inverse empirical Fisher fed by a training loop.

    Args:
        model: the network being trained (DDP / DataParallel wrappers are seen through).
        num_grads: N, gradients in the Fisher window (also the normaliser 1/N).
        damp: lambda > 0 (a number: the inverse starts at I / lambda before any gradient).
        block_size: c (None = whole weights; the inverses are dense ``B c^2`` floats).
        buffer: k, gradients per ``woodbury_update_`` launch (1 <= k <= N; default min(16, N)).
        every: use the gradients of one optimizer step in ``every``.
        modules: weights to track, as :class:`woodfisher.PruneConfig` ``modules``.
        exclude: weights not to track, as :class:`woodfisher.PruneConfig` ``exclude``.
        backend: kernel backend.
        pattern: the N:M pattern the curvature will prune with (``"2:4"``), or None: an N:M pattern lays conv
            weights' blocks out along their input channels (:mod:`woodfisher.layout`), so :func:`woodfisher.prune_with`
            refuses ``pattern="N:M"`` on conv weights of a hook made without it. It also fixes prune_with's sparsity.
    Attributes:
        count: gradients folded in or buffered in the current window (at most N).
        params: the tracked Parameter objects (read at :meth:`reset`; masks attached later keep them, so
            their gradients are still read; pruned entries then get zero gradients).
        inverses: {weight name: (B, c, c)} running inverses (the buffer is not yet in them).
    Raises:
        ValueError: bad arguments (naming them); a tracked weight with ``requires_grad=False`` (``modules``); with
            an N:M ``pattern``, a weight named in ``modules`` whose input channels per group / row length are not a
            multiple of M (the default targets leave such weights dense, with one warning).

    Example::

        hook = FisherHook(model, num_grads=64, damp=1e-4, block_size=128, buffer=16).attach(optimizer)
        for step, (x, y) in enumerate(loader):
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
            if hook.ready and step in prune_steps:
                woodfisher.prune_with(model, hook.curvature(), sparsity_at(step), keep_masks=True)
                hook.reset()

    ``keep_masks=True`` holds the zeros through the training steps that follow (without it the next
    optimizer steps revive them: their gradients and the optimizer's momentum are not zero).
    """

    def __init__(self, model: nn.Module, *, num_grads: int, damp: float, block_size: Optional[int] = None,
                 buffer: Optional[int] = None, every: int = 1, modules=None, backend: str = "auto",
                 pattern: Optional[str] = None, exclude=None):
        check_int("num_grads", num_grads)
        if isinstance(check_damp(damp), str):
            raise ValueError("damp must be a number > 0 for a running inverse (it starts at I / damp), got 'auto'")
        buffer = min(16, num_grads) if buffer is None else buffer
        check_int("buffer", buffer)
        check_int("every", every)
        if buffer > num_grads:
            raise ValueError(f"buffer must be <= num_grads ({num_grads}), got {buffer}")
        config = PruneConfig(sparsity=pattern_fixed_sparsity(pattern, 0.0), block_size=block_size, num_grads=num_grads,
                             damp=float(damp), modules=modules, exclude=exclude, backend=backend, progress=False,
                             group=None,
                             pattern=pattern)
        self.model, self.buffer_size, self.every = model, buffer, every
        self.steps = 0
        self._handle = None
        with warnings_held():  # the pattern's notice only for a hook that is made (reset checks the weights)
            self.config = fit_pattern(model, config)  # N:M by default: the weights it fits
            self.reset()

    # ---- window ---------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new window: inverses back to I / damp, weights and masks read again.

        Raises:
            ValueError: a tracked weight with ``requires_grad=False`` (naming ``modules``; nothing is reset).
        """
        targets = resolve_targets(self.model, self.config.modules, self.config.block_size,
                                  channels_last=self.config.channels_last, exclude=self.config.exclude)
        frozen = [target.name for target in targets if not target.param.requires_grad]
        self.config.method_impl.check_targets(targets, self.config)  # weights an N:M pattern does not fit
        if frozen:
            trainable = [target.name for target in targets if target.param.requires_grad]
            fix = (f"name the trained weights, modules={trainable}" if trainable else
                   "none of the tracked weights is trained: set requires_grad=True on the ones to prune")
            raise ValueError(f"modules: {frozen} have requires_grad=False: the training loop gives them no .grad, "
                             f"so their Fisher would stay damp * I and rank them least important; {fix}")
        self.targets = targets
        # The Parameter objects themselves: masks attached later (attach_masks, GradualPruner) keep them (as
        # ``weight_orig``) while ``module.weight`` becomes a derived tensor without ``.grad``.
        self.params = [target.param for target in targets]
        self.dtype = compute_dtype(self.targets[0].param.dtype)
        with caller_modes_off():  # inverses made under inference_mode could not be updated in place later
            self.keep = {target.name: target.keep_mask() for target in self.targets}
            self.inverses: Dict[str, torch.Tensor] = {}
            for target in self.targets:
                eye = torch.eye(target.block_size, dtype=self.dtype, device=target.param.device) / self.config.damp
                self.inverses[target.name] = eye.expand(target.num_blocks, -1, -1).contiguous()
            # per block (1 + 1e-3) ||G||_F^2 of the window so far: N damp times an upper bound of its kappa
            self._frob = {target.name: torch.zeros(target.num_blocks, dtype=torch.float64) for target in self.targets}
        self.count = 0
        self.stats = FisherStats.live(self.keep)
        self.seconds = 0.0
        self._pending: List[Dict[str, torch.Tensor]] = []

    @property
    def ready(self) -> bool:
        """True once the window holds N gradients (later steps are ignored until :meth:`reset`)."""
        return self.count >= self.config.num_grads

    # ---- feeding --------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> "FisherHook":
        """Read the gradients before every ``optimizer.step()`` (replacing an earlier attachment).

        Args:
            optimizer: the training loop's ``torch.optim.Optimizer``.
        Returns:
            ``self``.
        Raises:
            ValueError: ``optimizer`` not a ``torch.optim.Optimizer`` (the earlier attachment is kept).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.detach()
        self._handle = optimizer.register_step_pre_hook(self._before_step)
        return self

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.observe()

    def detach(self) -> None:
        """Stop reading the optimizer's steps."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def observe(self) -> bool:
        """Take the current ``.grad`` of the tracked weights (one optimizer step).

        Every ``every``-th call is used until N gradients are in; they are folded into the inverses
        by Sherman-Morrison updates (WoodFisher paper, Eq. 2) every ``buffer`` gradients.

        Returns:
            True if this step's gradients were used.
        Raises:
            ValueError: a gradient with NaN or Inf (naming the weight; the step is not used).
        """
        self.steps += 1
        if self.ready or (self.steps - 1) % self.every:
            return False
        grads = {}
        for target, param in zip(self.targets, self.params):
            g = param.grad
            g = (
                torch.zeros(param.shape, dtype=self.dtype, device=param.device)
                if g is None
                else g.to(self.dtype)
            )
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"gradient of {target.name!r} contains NaN or Inf; step not used")
            grads[target.name] = (g * self.keep[target.name]).reshape(-1)
        self._pending.append(grads)
        self.count += 1
        if len(self._pending) == self.buffer_size or self.ready:
            self.flush()
        return True

    @torch.no_grad()
    def flush(self) -> None:
        """Fold the buffered gradients into the inverses (one ``woodbury_update_`` per weight)."""
        if not self._pending:
            return
        start = time.perf_counter()
        for target in self.targets:
            g = torch.stack([p[target.name] for p in self._pending])
            self.stats.sum_sq += float(g.double().square().sum())
            blocks = target.grad_blocks(g)
            self._frob[target.name] += wk.condition_estimate(blocks, 1.0, 1.0, upper=True).cpu()
            wk.woodbury_update_(self.inverses[target.name], blocks, self.config.num_grads,
                                backend=self.config.backend, check_finite=False)
        self.stats.count += len(self._pending)
        self._pending = []
        self.seconds += time.perf_counter() - start

    # ---- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """The current window, to save next to the model's and optimizer's state (resume mid-window).

        Returns:
            dict: "settings" (num_grads, damp, block_size, buffer, every), "steps" (optimizer steps seen),
            "count", "inverses" and "keep" ({weight name: CPU tensor}), "pending" (buffered gradients, a list of
            such dicts), "sum_sq" (float64 sum of the squared gradients folded in), "folded" (their count) and
            "frob" ({weight name: (num_blocks,) float64}, the per-block bound behind :meth:`curvature`'s ``kappa``).
        """
        cpu = lambda d: {k: v.detach().to("cpu", copy=True) for k, v in d.items()}  # noqa: E731  (not the live ones)
        return {"settings": self._settings(), "steps": self.steps, "count": self.count,
                "inverses": cpu(self.inverses), "keep": cpu(self.keep), "pending": [cpu(p) for p in self._pending],
                "sum_sq": self.stats.sum_sq, "folded": self.stats.count, "frob": cpu(self._frob)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the window saved by :meth:`state_dict` (same settings and weights; checked first).

        Args:
            state: a dict from :meth:`state_dict`.
        Raises:
            ValueError: not a FisherHook state, other settings (naming them), or inverses / masks whose weight names
                or shapes differ from this hook's; the hook is unchanged then.
        """
        keys = ("settings", "steps", "count", "inverses", "keep", "pending", "sum_sq", "folded", "frob")
        if (not isinstance(state, dict) or any(k not in state for k in keys) or not isinstance(state["settings"], dict)
                or not isinstance(state["pending"], (list, tuple))):
            raise ValueError(f"state is not a FisherHook state_dict (keys {list(keys)})")
        diff = {k: (v, state["settings"].get(k)) for k, v in self._settings().items()
                if state["settings"].get(k) != v}
        if diff:
            raise ValueError(f"state has other settings (this hook's value, the state's): {diff}")
        weights = {t.name: tuple(param.shape) for t, param in zip(self.targets, self.params)}
        _check_part(state["inverses"], {k: tuple(v.shape) for k, v in self.inverses.items()}, "inverses")
        _check_part(state["keep"], weights, "keep")
        _check_part(state["frob"], {k: tuple(v.shape) for k, v in self._frob.items()}, "frob")
        for pending in state["pending"]:
            _check_part(pending, {k: (math.prod(shape),) for k, shape in weights.items()}, "pending")
        devices = {target.name: param.device for target, param in zip(self.targets, self.params)}
        to = lambda d, dtype: {k: v.to(devices[k], dtype, copy=True) for k, v in d.items()}  # noqa: E731
        with caller_modes_off():
            self.inverses = to(state["inverses"], self.dtype)
            self.keep = to(state["keep"], torch.bool)
            self.stats.numel = live_coordinates(self.keep)
            self._pending = [to(p, self.dtype) for p in state["pending"]]
            self._frob = {k: v.to("cpu", torch.float64, copy=True) for k, v in state["frob"].items()}
        self.steps, self.count = int(state["steps"]), int(state["count"])
        self.stats.sum_sq, self.stats.count = float(state["sum_sq"]), int(state["folded"])

    def _settings(self) -> dict:
        return {"num_grads": self.config.num_grads, "damp": self.config.damp, "block_size": self.config.block_size,
                "buffer": self.buffer_size, "every": self.every, "pattern": self.config.pattern}

    # ---- pruning --------------------------------------------------------------------
    def curvature(self) -> Curvature:
        """The current window as a :class:`woodfisher.curvature.Curvature` for :func:`woodfisher.prune_with`.

        The inverses are the hook's own tensors (not copies): prune, then :meth:`reset`.
        Before N gradients the Fisher term is scaled by ``count / N`` (the normaliser is N).
        The running inverses are float32 and the gradients are not kept, so no block can be recomputed in
        float64 (as :func:`woodfisher.estimate_curvature` does): ``kappa`` records each weight's largest
        upper bound ``(1 + 1e-3) ||G||_F^2 / (N damp)`` of its blocks' kappa, and a UserWarning names the
        weights with ``eps32 * kappa > 1e-3`` (fewer than 3 correct digits guaranteed; at kappa 9e4 a
        diagonal was 1.5e-3 off float64) and the damp that brings them under the level.

        Returns:
            A blockwise :class:`Curvature` (forms "stream").
        Raises:
            ValueError: no gradient observed yet.
        """
        if self.count == 0:
            raise ValueError("FisherHook has observed no gradient yet: run optimizer steps first")
        self.flush()
        config = self.config.replace(modules=tuple(target.name for target in self.targets))
        damp = self.config.damp
        kappa = {n: float(f.max()) / (self.config.num_grads * damp) for n, f in self._frob.items() if f.numel()}
        self._warn_conditioning(kappa)
        return Curvature("blockwise", config, {target.name: target.layout() for target in self.targets},
                         inverses=dict(self.inverses), forms={target.name: "stream" for target in self.targets},
                         damp=damp, stats=self.stats, keep=dict(self.keep), kappa=kappa,
                         timings={"gradients": 0.0, "inverse": self.seconds})

    def _warn_conditioning(self, kappa: Dict[str, float]) -> None:
        """One UserWarning naming the float32 running inverses with ``eps32 * kappa > 1e-3`` (upper bounds)."""
        if self.dtype != torch.float32:
            return
        bad = sorted(((k, n) for n, k in kappa.items() if EPS32 * k > WARN_LEVEL), reverse=True)
        if not bad:
            return
        listed = ", ".join(f"{n!r} (kappa <= {k:.2g})" for k, n in bad[:8]) + (" ..." if len(bad) > 8 else "")
        needed = self.config.damp * bad[0][0] * EPS32 / WARN_LEVEL
        warn_at_caller(f"FisherHook: the float32 running inverses of {listed} may hold fewer than 3 correct digits "
                       f"(eps32 * kappa > {WARN_LEVEL:g}, kappa bounded by ||G||_F^2 / (N damp); the gradients are "
                       f"not kept, so they cannot be recomputed in float64): pass damp >= {needed:.2g}, or prune "
                       "with woodfisher.estimate_curvature, which recomputes such blocks in float64")

def _check_part(part, shapes: Dict[str, tuple], what: str) -> None:
    """``part`` ({weight name: tensor}) must hold exactly the weights of ``shapes``, with those shapes."""
    theirs = {k: tuple(v.shape) for k, v in part.items()} if isinstance(part, dict) else None
    if theirs != shapes:
        raise ValueError(f"state[{what!r}] holds {theirs}, this hook tracks {shapes}")
