"""`matvlm` subcommands: thin command-line files registered in `matvlm_hf.cli.COMMANDS`; the work lives in the
modules they call."""
