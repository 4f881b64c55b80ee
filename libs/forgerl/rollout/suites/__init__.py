"""Built-in task suites: `tooluse` (learnable, generated from a seed) and `swe` (small buggy repositories)."""
