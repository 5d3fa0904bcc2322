"""memtree's dashboard: the queue as a web page (``memtree dashboard``, or mounted as an
ASGI app in the application's own). Needs the ``dashboard`` extra (Starlette, Jinja2,
and uvicorn to serve it on its own)."""

from memtree.dashboard.app import DEFAULT_REFRESH_S, create_app

__all__ = ["DEFAULT_REFRESH_S", "create_app"]
