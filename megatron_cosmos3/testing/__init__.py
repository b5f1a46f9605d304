"""Helpers for the project's own tests (multi-process launching)."""
