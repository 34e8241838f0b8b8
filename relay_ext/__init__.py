"""relay's Cython core.  Import `relay_ext._core` (built by `make build`)."""
