"""One module per Cloud Function, named after it: what ``functions/<name>/main.py`` calls."""
