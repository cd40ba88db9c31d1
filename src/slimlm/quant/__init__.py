"""Quantization: schemes, pure primitives, QuantizedLinear, kernels and the methods that produce them."""
