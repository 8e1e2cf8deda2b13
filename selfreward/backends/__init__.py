"""Backends: generation engines, judges, and model sources."""
