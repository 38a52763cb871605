"""`python -m hest_core.bench`: the runtime benchmark (`runtime.py`)."""

from .runtime import main

if __name__ == "__main__":
    main()
