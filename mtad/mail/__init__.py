"""Message content: MIME, DKIM, tracking."""
