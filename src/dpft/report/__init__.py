"""Collect results.json files into privacy-utility tables and plots."""
