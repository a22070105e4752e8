"""Serving: an OpenAI-compatible HTTP API and a web chat page for one loaded model.

    from hyperowl.serve import create_app, ServeConfig
    app = create_app(model, model.processor, ServeConfig(model_name="owl3"))   # a FastAPI app

`hyperowl serve --model M` runs it with uvicorn. Needs the `serve` extra (fastapi, uvicorn, httpx).
Modules: protocol (wire format, errors), schema (the published request/response models, /openapi.json),
media (URLs -> bytes -> images/frames), prompt (request -> token ids + per-item visual work), feature_cache
(LRU of image embeddings), scheduler (queue + dynamic batching worker), app (routes), web/ (the chat page),
url_policy (which http(s) media URLs may be fetched), completions (legacy /v1/completions), responses (the
Responses API, /v1/responses, and its store of past responses).
"""

from .app import ServeConfig, ServerThread, create_app, serve
from .url_policy import UrlPolicy

__all__ = ["ServeConfig", "ServerThread", "UrlPolicy", "create_app", "serve"]
