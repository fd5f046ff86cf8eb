"""Observability: Prometheus metrics, health and readiness, structured logs (issue 9 item 6)."""
