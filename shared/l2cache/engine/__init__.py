"""The feature engine: a chunk's labels in, one row of features per L2 node out."""
