"""What the server and the workers both import: the wire contract (protocol.py) and the
URL guard (urlguard.py). Only pydantic, httpx and the standard library: a worker image
never needs the server's packages (tests/integration/test_worker_boundary.py)."""
