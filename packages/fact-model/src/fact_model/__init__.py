"""FaCT: B-cos networks with bias-free TopK SAEs inside, and exact concept explanations."""

__version__ = "0.1.0"
