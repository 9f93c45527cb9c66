"""Run the configured RPyC services: ``python server.py --config config.yaml``."""

import sys

from rpyc_host.cli import main

if __name__ == "__main__":
    sys.exit(main())
