"""Process plumbing every layer may use: structured logs, GC deferral, safe unpickling."""
