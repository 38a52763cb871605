"""The HEST adapter: what chooses a path per (layer, token) and what it changes in the weights.

Owns the controllers (`controller.py`; their C form at decode, `native_controller.py`), the
spectral weight change W + U diag(s z) V^T and its SVD cache (`spectral.py`), the artifact on
disk (`artifact.py`: `load_adapter`, `HestAdapter`) and the adapter shipped for the default
model (`adapters/`).

May import: the foundation modules and `exec` (the model's weights and kernels). Nothing of
energy or requests (tests/test_import_graph.py).
"""
