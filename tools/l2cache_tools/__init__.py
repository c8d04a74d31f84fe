"""Tooling around the l2cache core, never deployed: the operator's CLI, the local stack
(emulators and functions on loopback), and the dataset builder behind the demo and tests.

What runs in the cloud is ``shared/l2cache`` alone (each function's archive holds only
that package); this package imports it, never the other way round.
"""
