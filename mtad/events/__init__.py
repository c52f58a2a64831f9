"""Event stream consumers: the SQL recorder, webhooks."""
