"""Distil a MaTVLM hybrid from its teacher: a thin wrapper around `matvlm_hf.train_cli` (see its docstring).

    python examples/train_distill.py --config examples/configs/distill_paper.yaml \
        --student ckpt/matvlm-25 --teacher ckpt/teacher --data data.json --images data/ --output runs/matvlm-25
    accelerate launch --num_processes 4 examples/train_distill.py --config examples/configs/distill_paper.yaml ...
"""

from matvlm_hf.train_cli import main

if __name__ == "__main__":
    main()
