"""Accounting and calibration, the ledger, and the noise mechanisms."""
