"""Tokenisation, vocabularies, batching and the corpora shipped with the package."""
