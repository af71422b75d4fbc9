"""Bridges to external tools (lmms-eval, ...); each is an optional extra, imported only when used."""
