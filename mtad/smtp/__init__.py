"""SMTP: sans-I/O server and client state machines with thin Twisted glue."""
