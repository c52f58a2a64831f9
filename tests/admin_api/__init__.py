"""Tests for admin_api."""
