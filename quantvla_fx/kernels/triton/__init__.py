"""The ``triton`` kernel: our W4A8 GEMM (int8 tensor-core dot, int4 weights decoded in registers).

``jit`` is the Triton program, ``launch`` runs it with one tile configuration, ``tiles`` lists the
candidates (data in ``configs/*.json``), ``tune`` times them once per GPU and shape and remembers
the winner, ``kernel`` is the object the registry hands out.  Nothing here is imported until the
kernel is asked for.
"""
