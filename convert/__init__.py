"""Conversion steps: export, validate, optimize, quantize, sparsity, TensorRT engines.

Each step is a plain function ``step(...)`` that reads an artifact and writes a new one atomically.
"""
