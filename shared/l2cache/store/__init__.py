"""What l2cache keeps: the cache table's rows and the runs ledger's writes."""
