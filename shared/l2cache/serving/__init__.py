"""The lookup API behind the lookup function: routes, formats, CAVE auth."""
