"""Checkpointing: universal format, lazy asynchronous engine, resharding loader."""
