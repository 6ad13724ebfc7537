"""The admin API (EXT_PROC_ADMIN_PORT): the control plane of the gateway.

``app`` (the FastAPI routes), ``schemas`` (bodies and answers, declared from the
gateway.yaml models), ``edits`` (catalog changes: validated, audited, announced),
``auth`` (tokens and roles), ``activity`` (the live stream of finished requests),
``probe`` (provider tests), ``errors`` (the gateway's error shape), ``server`` (uvicorn
in the ext_proc process's event loop).
"""
