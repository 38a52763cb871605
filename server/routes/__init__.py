"""The HTTP routes, one module-level `APIRouter` per area (as vLLM's entrypoints): `summarize`
(native API), `chat` (OpenAI chat completions), `models` (OpenAI models), `operations`
(metrics, health, info). Handlers get the app's state through `server/state.py` dependencies,
map the body with `server/requests.py`, and leave queueing to `server/serving.py`."""
