"""Clients of a loraplex server: `python/` (httpx library), `cli.py` (the `loraplex` command), `web/` (chat page)."""
