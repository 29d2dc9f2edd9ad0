"""User-facing adapters: the command line (and, later, the server)."""
