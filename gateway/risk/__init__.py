"""Distillation risk: per-request signals, template fingerprints, shared signal state, scoring."""
