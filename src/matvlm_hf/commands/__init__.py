"""Thin `matvlm` subcommands: each parses its options and calls the library."""
