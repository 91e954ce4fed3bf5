"""B-cos networks: dynamic-linear layers, model zoo, official B-cos-v2 checkpoints, exact explanations."""

__version__ = "0.1.0"
