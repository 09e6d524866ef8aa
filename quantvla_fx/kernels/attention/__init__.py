"""Attention kernels behind ``quantvla::attention`` (quantvla_fx/ops/attention.py).

``reference`` (SDPA math in fp32, the definition), ``triton_splitkv`` (few queries: split-KV with
the query heads of one KV head packed into one tile of rows), ``triton_flash`` (long queries),
``select`` (which one runs, from ``quantvla_fx.attention_support``'s rules).  Every kernel takes
q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), key_valid (B, Lk) / query_valid (B, Lq) bool or None and
a scale, and returns (B, Hq, Lq, D) in q's dtype.
"""
