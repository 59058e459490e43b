"""CPU seconds of one ranking statistics step (forward + backward of one 256-token sequence,
SmolLM2-135M, Taylor hooks) under three OpenMP settings, each in a fresh process.

  python benchmarks/omp_wait_policy.py

torch's OpenMP threads spin while they wait for each other. On a machine whose cores are busy
with other jobs a waiting thread spins through its partner's time slices, so CPU seconds (and
wall time) grow with the machine's load; ``OMP_WAIT_POLICY=PASSIVE`` (the converter's default)
lets them sleep. Prints one line per setting; report the machine's load with it.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = (
    {"OMP_NUM_THREADS": "1"},
    {},  # torch's default: one thread per core, OpenMP's default (spinning) wait policy
    {"OMP_WAIT_POLICY": "PASSIVE"},
)
STEPS = 4


def measure() -> None:
    import time

    import torch

    from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
    from megatron_flextron.importance import ranking_model
    from megatron_flextron.importance.collect import collect_statistics
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1)
    source = load_gguf(bundled_smollm2(), with_tokenizer=False)
    model = ranking_model(source)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 49152, (257,), generator=g).tolist() for _ in range(STEPS)]
    batches = pad_microbatches(seqs, 1)
    collect_statistics(model, batches[:1], source.model, True)  # warm-up
    cpu, wall = time.process_time(), time.time()
    collect_statistics(model, batches, source.model, True)
    print(
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')} "
        f"threads={torch.get_num_threads()}: "
        f"{(time.process_time() - cpu) / STEPS:.2f} CPU-s, {(time.time() - wall) / STEPS:.2f} s "
        f"wall per sequence; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def main() -> int:
    if sys.argv[1:] == ["--child"]:
        measure()
        return 0
    base = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
    }
    for setting in SETTINGS:
        env = {**base, **setting, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(
            [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True
        )
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        print(out.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
