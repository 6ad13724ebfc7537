"""Benchmarks: ``python -m bench`` (the whole stack under wrk, see ``bench/run.py``) and
``bench/micro_tokens.py`` (the token-accounting hot functions, one core)."""
