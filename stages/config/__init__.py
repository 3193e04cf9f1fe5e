"""Typed params of every stage, the presets, and the one resolver that fills them (defaults < preset <
params.yaml < --set)."""
