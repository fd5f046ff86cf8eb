"""Blob stores: where instance bytes live (filesystem or S3-compatible object store)."""
