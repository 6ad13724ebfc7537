"""LLM gateway ext_proc service: auth, routing, policies, token accounting, usage records."""

__version__ = "0.1.0"
