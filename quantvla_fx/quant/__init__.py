"""Quantization math shared by passes, ops and kernels (no graph code, no kernels)."""
