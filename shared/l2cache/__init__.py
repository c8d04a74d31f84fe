"""l2cache: a serverless cache of per-L2-node geometric features for PyChunkedGraph datasets.

Every function, the CLI and the tests import this one package, so a feature is
computed, stored and served by the same code wherever it runs.
"""

__version__ = "0.1.0"
