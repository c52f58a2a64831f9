"""Send limits: each server's messages counted in a rolling window in Redis, shared by every process."""
