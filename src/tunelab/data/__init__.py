"""Data sources: files -> datasets -> batches. See `tunelab.data.base`."""

from tunelab.data.base import DataBundle, build_data, register_data

__all__ = ["DataBundle", "build_data", "register_data"]
