"""Pruning: unstructured magnitude masks, schedules, N:M masks, structured channel removal."""
