"""Routing: which endpoint an app called, which provider deployment serves the model."""
