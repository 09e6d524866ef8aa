"""W4A8 GEMM kernels behind the quantvla custom ops.

``registry`` (kernels by name), ``select`` (which one runs: the op's entry point), ``verify``
(exactness against ``reference``), ``cache`` (per-GPU files), ``timing``; one folder per kernel
family (``triton/``, ``bitblas/``).  Passes never import this package: they ask
``quantvla_fx.kernel_support``, which answers from shape and device rules alone.
"""
