"""granite-mlx's local server: OpenAI- and Ollama-compatible HTTP over the engine.

``granite-mlx serve`` (`granite_mlx.serve.cli.main`) loads a model, starts one
`granite_mlx.engine.EngineThread` (continuous batching, the prompt cache) and serves:

* OpenAI: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``;
* Ollama: ``POST /api/chat``, ``POST /api/generate``, ``GET /api/tags``,
  ``POST /api/show``, ``GET /api/ps``, ``GET /api/version``;
* ``GET /health``.

The layers, each in its module:

* `schemas`: request bodies as pydantic models (a 400 names the bad field);
* `translate`: a body -> a `Job` (prompt ids, the engine `Request`, snapshot points
  at message boundaries so the prompt cache serves shared conversation prefixes);
* `service`: admission (503 when full), hang-ups cancelling engine rows, the answer
  being assembled (text, tool calls, log-probabilities, usage);
* `openai_api`, `ollama_api`: routes and response shapes; `web`: HTTP plumbing;
* `app`: the Starlette app, API key, error shapes, uvicorn server with clean shutdown.

The server is a client of the library's public API only; the library never imports it.
"""

from .app import Server, create_app
from .service import Service

__all__ = ["Server", "Service", "create_app"]
