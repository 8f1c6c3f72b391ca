"""Friction: policy actions that make distillation expensive (challenges, degrade, tarpit, caps)."""
