"""I/O around the pure core: database, listener, providers, HTTP server, metrics, embedded DB."""
