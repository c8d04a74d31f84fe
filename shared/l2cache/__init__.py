"""l2cache: the cloud core, the only code inside a function's deploy archive.

Layers, each importing only from the ones before it (``tests/test_layers.py``):
``support``, ``domain`` -> ``config`` -> ``engine``, ``gcp`` -> ``inputs``, ``store``
-> ``compute``, ``serving`` -> ``handlers`` (one module per function). Operations
(``l2cache_ops``) and the dev tools (``l2cache_tools``) import this package; it never
imports them.
"""

__version__ = "0.1.0"
