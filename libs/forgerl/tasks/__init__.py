"""Task sets from outside: SWE-bench-format instances imported, built and validated (swebench.py)."""
