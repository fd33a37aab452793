"""``python -m pyllm.server [flags]``: the same as ``pyllm serve [flags]``."""
import sys

from pyllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
