"""Triton backend: registers ops when triton is importable."""
