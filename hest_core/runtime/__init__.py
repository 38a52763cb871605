"""The runtime: requests in, results out, each within its energy budget.

Owns the engine (`engine.py`: `Engine.from_pretrained`, `generate`), the request types
(`request.py`) and their admission (`admission.py`, `budget.py`, `prompt.py`, `reading.py`,
`decoding.py`), continuous batching (`scheduler.py`, `tickets.py`, `generation.py`,
`results.py`), the budget guard (`guard.py`) and clean endings (`endings.py`). It knows no HTTP:
the server (server/) calls it.

May import: every other package of hest_core (foundation, `exec`, `adapter`, `energy`); none of
them imports it (tests/test_import_graph.py).
"""
