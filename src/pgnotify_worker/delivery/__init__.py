"""Delivery through the ports: the claim loop, the dispatcher, failover and templates."""
