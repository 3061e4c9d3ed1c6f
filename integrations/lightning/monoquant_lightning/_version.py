"""The installed monoquant-lightning version (one place: read by pyproject.toml)."""

__version__ = "0.2.0"
