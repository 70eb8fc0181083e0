"""The builtin prompt corpus (JSONL), written for this project."""
