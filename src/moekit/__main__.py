"""`python -m moekit ...` is the `moekit` command (torchrun runs it as `torchrun ... -m moekit train ...`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
