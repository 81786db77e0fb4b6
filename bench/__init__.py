"""The trismtp benchmark harness: ``make bench`` (see bench/README.md)."""
