"""Google Cloud clients: Bigtable (one read path, one write path), Pub/Sub, Cloud Tasks."""
