"""Convert a TinyLLaVA checkpoint to a MaTVLM hybrid checkpoint (same as `matvlm convert`).

python conversion/convert_tinyllava_to_matvlm.py --input DIR --output DIR --mamba-ratio 0.25
"""

from matvlm_hf.conversion import main

if __name__ == "__main__":
    main()
