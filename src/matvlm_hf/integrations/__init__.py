"""Integrations with serving and evaluation engines. Each submodule imports its engine; importing matvlm_hf does not."""
