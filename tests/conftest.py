"""tests/: helpers beside the tests (reference_features, lookup_support...) are
importable; the session emulators are the repository's root ``conftest.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_features.py etc.
