"""The conversion library: TinyLLaVA and the authors' layout to and from matvlm-hf, fabricated checkpoints."""
