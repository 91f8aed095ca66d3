"""``python -m shard_tools ...`` is the same as the ``shard-tools`` console script."""

import sys

from shard_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
