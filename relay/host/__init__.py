"""Facts about this host: the probes (/proc readers, kernel feature checks) and `relay doctor`."""
