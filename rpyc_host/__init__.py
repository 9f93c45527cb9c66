"""rpyc_host: run RPyC services from a YAML file, securely and fast.

The pieces, one module each: ``config`` (validated settings), ``exposure`` (classes to
services), ``servers`` (threaded, threadpool, forking), ``transport`` (tuned channels),
``protocol`` (safe rpyc settings), ``host`` (start and graceful stop), ``classic`` (debug
console), ``cli`` (``server.py``).
"""

__version__ = "0.1.0"
