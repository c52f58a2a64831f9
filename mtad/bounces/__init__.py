"""Bounces and complaints: what comes back to the return path, kept durably, read, and matched to the
message it is about (VERP first, Postal's ``X-Postal-MsgID`` after), as events on the stream."""
