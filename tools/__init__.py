"""Developer and test tools: fake DNS server, sink SMTP server, benchmarks and dev scripts."""
