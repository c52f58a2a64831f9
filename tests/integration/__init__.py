"""Integration tests: real sockets on 127.0.0.x, real Redis and SQL, fake DNS, sink SMTP servers."""
