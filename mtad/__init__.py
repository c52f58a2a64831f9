"""mtad: a mail delivery platform on Twisted.

SMTP and HTTP in, a durable queue in Redis, metadata in SQL, delivery to the recipients' MX servers.
"""

__version__ = "0.1.0"
