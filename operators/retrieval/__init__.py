"""Candidate retrieval: tiered vector indexes and co-occurrence candidates."""
