"""The `forgerl` command line."""
