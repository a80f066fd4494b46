"""`python -m jaxpref COMMAND [ARGS]`: the `jaxpref` command (`jaxpref.cli`)."""
import sys

from jaxpref.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m jaxpref"))
