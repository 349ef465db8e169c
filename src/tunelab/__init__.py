"""tunelab: a PyTorch-2 toolkit for developing and fine-tuning models."""

__version__ = "0.1.0"
