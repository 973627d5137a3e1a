"""`python -m fxcompress ...`: the same command as the `fxcompress` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
