"""Plain model definitions: buildable and runnable in one process, no process groups."""
