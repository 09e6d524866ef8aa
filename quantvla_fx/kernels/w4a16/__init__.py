"""W4A16 (weight-only int4) GEMM kernels behind ``quantvla::w4a16_linear``.

Activations in their own float dtype × int4 weights in the canonical packed format
(quant/int4_pack.py) with fp32 scales per output channel [N] or per group [N, K/g].
``reference`` (any device: dequantize, fp32 matmul), ``triton`` (bf16/fp16 tensor-core dot,
fp32 accumulation, int4 decoded in the K loop; triton_*.py), ``select`` (forced or ``auto``:
fastest verified), ``verify`` (what "correct" means).  Passes never import this package.
"""
