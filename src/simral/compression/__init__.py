"""Compression at rest: rules choosing which native instances are re-encoded losslessly, and the
durable jobs that do it (issue 9, item 2)."""
