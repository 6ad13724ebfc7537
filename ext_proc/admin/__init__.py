"""The admin HTTP API (EXT_PROC_ADMIN_PORT): health, readiness, usage rollups, reload."""
