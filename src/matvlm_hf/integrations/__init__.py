"""Bridges to external engines (lmms-eval, vLLM, ...): each is an optional extra whose submodule imports its engine;
importing matvlm_hf imports none of them."""
