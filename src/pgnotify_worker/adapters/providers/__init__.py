"""Provider adapters, one module per provider, on the shared HTTP helper in http.py."""
