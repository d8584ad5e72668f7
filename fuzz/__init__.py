"""Fuzz targets for what shmd trusts from another process (see fuzz/README.md)."""
