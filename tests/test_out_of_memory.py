"""An allocation failure mid-call keeps its type, leaves the model bit for bit, and says where and what to change."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import woodfisher as wf
import woodfisher.curvature as curvature_module
from woodfisher.memory import is_out_of_memory, note_out_of_memory

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)")


def test_allocation_failures_are_recognised_and_other_errors_are_not():
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(RuntimeError(CPU_OOM))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of range"))
    other = RuntimeError("shape mismatch")
    note_out_of_memory(other, "step 1/1")
    assert not getattr(other, "__notes__", None)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) need Python 3.11")
@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(CPU_OOM)])
def test_out_of_memory_in_the_second_step_restores_the_first_and_says_what_to_change(monkeypatch, error):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [(torch.randn(8, 12), torch.randint(0, 4, (8,))) for _ in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    real, calls = curvature_module.blockwise_from_grads, []

    def failing_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(curvature_module, "blockwise_from_grads", failing_in_step_two)
    with pytest.raises(type(error)) as info:
        wf.prune_one_shot(model, data, sparsity=0.8, num_grads=32, num_steps=2, block_size=8, progress=False)
    assert len(calls) == 2                                          # step 1 had pruned and updated the weights
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    note = " ".join(info.value.__notes__)
    assert "out of memory in step 2/2" in note and "model is unchanged" in note and "memory_budget=" in note
