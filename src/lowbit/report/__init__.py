"""Verification metrics, the report record, and its tables."""
