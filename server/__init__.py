"""HEST serving: FastAPI app over `hest_core` with energy budgets, batching and metrics.

`python -m server` serves the default model; `create_app(settings, engine=...)` builds an app
(tests pass a preloaded engine). Layout follows vLLM's entrypoints: `routes/` (one APIRouter
per area), `protocol.py` (pydantic models), `serving.py` (queue, batching scheduler, brownout),
`app.py` (assembles them), `metrics.py`; docs/server.md tables every file.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
