"""Nightly use: the run history (SQLite or PostgreSQL), the gate against a baseline and its verdict."""
