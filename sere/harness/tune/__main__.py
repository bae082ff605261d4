"""python -m sere.harness.tune: the `sere-tune` command (sere.harness.tune.cli)."""
import sys

from sere.harness.tune.cli import main

if __name__ == "__main__":
    sys.exit(main())
