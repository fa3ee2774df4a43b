"""Observability: the metrics hub and its sinks, events, MFU."""
