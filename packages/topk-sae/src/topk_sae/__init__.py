"""Bias-free TopK sparse autoencoders and a streaming, resumable trainer."""

__version__ = "0.1.0"
