"""``woodfisher export``: a pruned checkpoint -> dense / CSR / BSR / 2:4 / ONNX (see :mod:`woodfisher.export.cli`)."""
from __future__ import annotations

from ..export.cli import add_export_arguments, run_export


def add_parser(sub):
    return add_export_arguments(sub.add_parser("export", help="write a pruned model as dense, CSR, BSR, 2:4 or ONNX"))


run = run_export
