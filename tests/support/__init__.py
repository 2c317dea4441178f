"""Real components on loopback for tests: redis-server, upstreams, gateway processes."""
