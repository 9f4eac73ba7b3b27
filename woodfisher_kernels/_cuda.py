"""CUDA extension backend: registers ops when ``woodfisher_kernels._C`` is built."""
