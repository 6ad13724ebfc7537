"""Stores: Postgres (pool, migrations), Redis, the memory → Redis → Postgres cache."""
