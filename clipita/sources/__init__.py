"""Catalogue sources: the synthetic demo catalogue and features, and converters of public catalogues into the
catalogue format (clipita/catalog.py)."""
