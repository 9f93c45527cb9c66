"""``python -m rpyc_host --config config.yaml``: the host from an installed package (no checkout needed)."""

import sys

from rpyc_host.cli import main

if __name__ == "__main__":
    sys.exit(main())
