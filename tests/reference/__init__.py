"""Frozen copies of code as it was before an optimisation, for differential tests."""
