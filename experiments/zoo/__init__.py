"""A small model zoo: a synthetic language, trained tiny transformers, mechanistic head scores."""
