"""The installed monoquant version (one place; written into file headers)."""

__version__ = "0.2.0"
