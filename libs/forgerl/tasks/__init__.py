"""Task sets from outside: SWE-bench-format instances imported, built and validated (swebench.py), or mined
from a repository's history into that format (mining.py)."""
