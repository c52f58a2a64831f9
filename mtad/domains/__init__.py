"""Sending domains: the DNS records their owners publish (SPF, DKIM, return path, MX, verification) and
the checks, on demand and periodic, that they did. Domains and keys are stored by `mtad.store.domains`."""
