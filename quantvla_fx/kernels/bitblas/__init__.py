"""The ``bitblas`` kernel: BitBLAS 0.1.0.post1 int8 × int4 -> exact int32 operators.

``env`` makes ``import bitblas`` work in this process, ``build`` builds operators for the GPU in
hand and keeps BitBLAS's operator database, ``kernel`` is the object the registry hands out.
Nothing here is imported until the kernel is asked for.
"""
