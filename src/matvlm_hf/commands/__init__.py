"""Thin `matvlm` subcommands (registered in matvlm_hf.cli.COMMANDS)."""
