"""The local stack: real Google Cloud emulators and the functions, on loopback only."""
