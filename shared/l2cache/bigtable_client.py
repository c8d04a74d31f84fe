"""One way to build Bigtable clients, so every part talks to the same place.

With ``BIGTABLE_EMULATOR_HOST`` set, google-cloud-bigtable connects to the emulator
without credentials; otherwise it uses the environment's default credentials.
"""

from __future__ import annotations

from google.cloud import bigtable


def bigtable_instance(project: str, instance: str, admin: bool = False):
    """A ``google.cloud.bigtable`` Instance handle (admin for table creation)."""
    client = bigtable.Client(project=project, admin=admin)
    return client.instance(instance)
