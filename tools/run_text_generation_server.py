"""Serve a flextron checkpoint over HTTP in Megatron's request format, every budget from one copy.

  python tools/run_text_generation_server.py --load ckpt/smollm2 --port 5000
  curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \\
      -d '{"prompts": ["The capital of France is"], "tokens_to_generate": 16, "top_k": 1,
           "budget": 0.5}'
  curl -X POST localhost:5000/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "Hello", "max_tokens": 16, "temperature": 0,
           "subnetwork": {"mlp": 768, "heads": 6}}'
  torchrun --nproc-per-node 3 tools/run_text_generation_server.py --load ckpt/smollm2 \\
      --tensor-model-parallel-size 3 --port 5000

Rank 0 serves HTTP (megatron_flextron/inference/server.py documents the fields); under TP/PP the
other ranks follow its batches.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from generate import add_model_args, generator_from_args  # noqa: E402

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--batch-window-ms", type=float, default=50.0,
                   help="how long the first waiting request waits for others to batch with")
    return p.parse_args(argv)


def serve(args) -> None:
    """Rank 0 serves HTTP until interrupted; the other ranks follow its batches."""
    from megatron_flextron.inference.server import TextGenerationServer, follow

    generator = generator_from_args(args)
    if int(os.environ.get("RANK", "0")) != 0:
        follow(generator)
        return
    server = TextGenerationServer(
        generator, args.host, args.port, batch_window_s=args.batch_window_ms / 1e3
    )
    print(f"serving {args.load} on http://{args.host}:{server.port} "
          "(PUT /api, POST /completions)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def _main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_flextron.parallel import run_tool

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    return run_tool(lambda: serve(args), tp, pp)[0]


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
