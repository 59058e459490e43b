"""Elastic (Flextron) continued pretraining, Megatron style. Launch with torchrun:

  torchrun --nproc-per-node 2 tools/pretrain_flextron.py --tensor-model-parallel-size 2 \\
      --load ckpt/smollm2_ranked --save ckpt/smollm2_elastic \\
      --data-path data/wiki_train_text_document --seq-length 256 \\
      --micro-batch-size 4 --global-batch-size 32 --train-iters 1000 --lr 1e-4 \\
      --budget-list 1.0 0.75 0.5 0.35 --distill inplace

Every rank runs this script; a run restarted by torchrun resumes from the newest checkpoint in
--save. `--help` lists every flag.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import run_main  # noqa: E402
from megatron_flextron.training.arguments import parse_args  # noqa: E402


def _main(argv=None) -> int:
    args = parse_args(argv)  # exits with 2 and a message on inconsistent flags
    from megatron_flextron.parallel import destroy_model_parallel
    from megatron_flextron.training.trainer import pretrain

    try:
        pretrain(args)
    finally:
        destroy_model_parallel()
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
