"""Benchmarks and result scripts of woodfisher_kernels (not installed with the package).

Run them as modules from the repository root, e.g. ``python -m benchmarks.side_by_side``;
they import only the public API (``woodfisher_kernels``, ``woodfisher_kernels.testing``,
``woodfisher``) and each other as ``benchmarks.<module>``.
"""
