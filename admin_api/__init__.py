"""HTTP: the /api/v1 send API, management API, status and metrics."""
