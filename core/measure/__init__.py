"""Measurements of positional bias and of semantics: probes, metrics and reports."""
