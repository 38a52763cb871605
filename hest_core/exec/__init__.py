"""Execution: the lean decoder and what it runs on, per path.

Owns the model's weights as the runtime holds them (`weights.py`), the forward over a flat batch
of tokens (`model.py`) with path decisions per layer (`routing.py`), the products of each path
(`ops.py` 16-bit, `quant.py` int8, `q4.py` / `int4.py` / `gguf_blocks.py` int4), the KV cache
(`kvcache.py`, and `kvrows.py` for the rows of a running batch), the native C kernels
(`kernels/*.c`, built by `kernel_build.py`, called through `native.py`), the fused decode layer
(`fused.py`), the `torch.compile` graphs (`compiled.py`) and loading base models (`loading.py`).

May import: the top-level foundation modules (`errors`, `paths`, `config`, `cachedirs`,
`dtypes`) only. It knows no adapter, no energy and no request (tests/test_import_graph.py).
"""
