"""C2-score: concept consistency with DINOv2 features upsampled by LoftUp, for any concept method."""

__version__ = "0.1.0"
