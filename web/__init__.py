"""The local web page (`metaql serve`): needs the optional extra `web` (Starlette, uvicorn, Jinja2)."""
from metaql.web.app import create_app, serve

__all__ = ["create_app", "serve"]
