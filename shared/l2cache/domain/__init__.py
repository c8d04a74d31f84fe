"""The vocabulary: PCG ids, cell encodings, the failure contract, lineage, chunk regions.

Pure code (numpy at most): no I/O, no client libraries at import time.
"""
