"""Benchmarks of the runtime, each a command that prints ratios measured in one run against a
baseline measured in the same run (never a timed assertion in the test suite):

    python -m hest_core.bench       the runtime's ratios (`runtime.py`; `make bench`)
    python -m hest_core.bench.q4    the int4 decode kernel against int8 and bf16 (`q4.py`)
    python -m hest_core.bench.int4  decode on the fused layer with the four paths (`int4.py`)
    python -m hest_core.bench.floor int4 decode at batch 1 against its bandwidth floor, and a
                                    profile of the step (`floor.py`, issue 13)

A top layer, like `hest_core/__main__.py`: may import every package of hest_core; nothing in
hest_core imports it (tests/test_import_graph.py).
"""
