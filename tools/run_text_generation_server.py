"""Serve a flextron checkpoint over HTTP, every budget from one model copy: Megatron's request
format (PUT /api) and the OpenAI-compatible API (/v1/completions, /v1/chat/completions,
/v1/models), with continuous batching.

  python tools/run_text_generation_server.py --load ckpt/smollm2 --port 5000
  curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \\
      -d '{"prompts": ["The capital of France is"], "tokens_to_generate": 16, "top_k": 1,
           "budget": 0.5}'
  curl localhost:5000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2@0.5", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'
  torchrun --nproc-per-node 3 tools/run_text_generation_server.py --load ckpt/smollm2 \\
      --tensor-model-parallel-size 3 --port 5000

Rank 0 serves HTTP (megatron_flextron/inference/server.py documents the endpoints); under TP/PP
the other ranks follow its engine steps. SIGINT or SIGTERM cancels what is in flight and stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from generate import add_model_args, generator_from_args, quiet_upstream  # noqa: E402

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number in [0, 65535]")
    return int(text)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=port_number, default=5000, help="0: any free port")
    p.add_argument("--served-model-name",
                   help="model id of the full model (default: the checkpoint folder's name); "
                   "budgets and sub-networks are NAME@0.5, NAME@mlp768-heads6")
    return p.parse_args(argv)


def serve(args) -> None:
    """Rank 0 serves HTTP until SIGINT/SIGTERM; the other ranks follow its steps."""
    from megatron_flextron.inference.scheduler import follow
    from megatron_flextron.inference.server import TextGenerationServer

    generator = generator_from_args(args)
    if int(os.environ.get("RANK", "0")) != 0:
        follow(generator)
        return
    name = args.served_model_name or os.path.basename(os.path.normpath(args.load))
    server = TextGenerationServer(generator, args.host, args.port, model_name=name)

    def stop(signum, _frame):  # the serving thread cannot shut itself down: a helper does
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"serving {args.load} as model {name!r} on http://{args.host}:{server.port} "
          "(PUT /api, POST /v1/completions, POST /v1/chat/completions, GET /v1/models)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    print("stopped", file=sys.stderr, flush=True)


def _main(argv=None) -> int:
    args = parse_args(argv)
    quiet_upstream()
    from megatron_flextron.parallel import run_tool

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        return run_tool(lambda: serve(args), tp, pp)[0]
    except KeyboardInterrupt:  # interrupted while loading: nothing is served yet
        return 130


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
