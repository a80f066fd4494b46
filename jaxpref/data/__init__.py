"""Preference data: loading, formats, TRL-identical tokenization, layouts and typed batches."""
