"""`matvlm` subcommands: thin command-line files; the work lives in the modules they call."""
