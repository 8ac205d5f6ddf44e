"""Verification: tolerances, the parity check, reports and reproduction bundles."""
