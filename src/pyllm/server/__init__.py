"""``pyllm serve``: an OpenAI-compatible HTTP server over the batched engine (``pip install 'pyllm[server]'``).

``create_app(engine)`` is the ASGI app (FastAPI); ``serve(...)`` runs it under uvicorn with the
engine loading in the background, graceful SIGTERM handling and the settings of ``pyllm serve``.
"""
from pyllm.server.app import APIError, create_app
from pyllm.server.run import ServeSettings, serve

__all__ = ["APIError", "ServeSettings", "create_app", "serve"]
