"""mtad tests."""
