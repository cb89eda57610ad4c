"""Adapters that plug aiokvpipe into serving engines (each imports its engine
only when used; nothing below this package imports any of them)."""
