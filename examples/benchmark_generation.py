"""Teacher vs hybrids: decode speed, prefill time, peak memory, largest batch (same as `matvlm bench`).

python examples/benchmark_generation.py --out docs/benchmarks        # on a GPU, TinyLLaVA-3.1B sizes
python examples/benchmark_generation.py --size tiny --out /tmp/bench  # CPU smoke mode
"""

from matvlm_hf.benchmark import main

if __name__ == "__main__":
    main()
