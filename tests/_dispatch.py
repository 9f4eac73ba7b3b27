"""The aten operators a block of code dispatches (below autograd and vmap: what runs), for tests about operator
counts."""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class OperatorCount(TorchDispatchMode):
    """``with OperatorCount() as count: ...``; then ``count.seen``: {aten overload: calls}."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func] += 1
        return func(*args, **(kwargs or {}))
