"""Metrics (Prometheus) and traces (OpenTelemetry)."""
