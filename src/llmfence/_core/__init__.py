"""The checks: plain async objects that know nothing of ASGI."""
