"""OpenAI-compatible serving of an MoE model: continuous batching over a paged KV cache
(``moe_relayfree_models.serving``), on FastAPI + uvicorn.

    python scripts/serve.py                                   # built-in default model, 8 CPU devices
    python scripts/serve.py --checkpoint DIR --port 8000 --dispatch ragged-baseline
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Return the number of ", "max_tokens": 32, "temperature": 0}'

Takes the same model, mesh, dtype and dispatch flags as ``scripts/infer.py``, plus
``--host`` / ``--port`` and the engine's sizes. SIGTERM (or Ctrl-C) stops accepting, lets the
requests in flight finish, and exits 0.

Several processes (``--coordinator HOST:PORT --num-processes N --process-id I`` on each, as
for ``infer.py``): process 0 serves HTTP and schedules; the others run the steps it sends and
exit when it stops.
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_relayfree_models.cli import SetupError, add_model_args, load, positive_int, prepare, start_process


def GracefulServer(config):
    """uvicorn's server, ending with exit status 0 after a SIGTERM/SIGINT shutdown: uvicorn
    stops accepting, lets the requests in flight finish (the app drains the engine), then
    re-raises the signal, which would end the process with it instead."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server(config)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the checkpoint folder's name)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the "
                        "checkpoint's chat_template.jinja or tokenizer_config.json's)")
    p.add_argument("--max-seqs", type=positive_int, default=16, help="sequences per step")
    p.add_argument("--max-step-tokens", type=positive_int, default=256,
                   help="tokens per step: decode tokens first, then prefill chunks")
    p.add_argument("--chunk", type=positive_int, default=64, help="largest prefill chunk per request")
    p.add_argument("--chunk-buckets", type=positive_int, default=3,
                   help="query-row sizes of steps with chunks: chunk, chunk/2, ... (fewer: fewer "
                        "shapes to compile, more padding for short prompts)")
    p.add_argument("--page-size", type=positive_int, default=16, help="KV cache rows per page")
    p.add_argument("--num-pages", type=positive_int, default=None,
                   help="KV pages in the pool (default: every sequence at full length; fewer: "
                        "requests are admitted on their prompts' pages and the newest is "
                        "preempted and recomputed when pages run out)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="the longest request served, prompt and completion (default: the "
                   "model's max_position_embeddings)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="waiting requests past which the server answers 429")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="prefill every prompt whole (default: prompts that start with pages "
                        "another request filled take them)")
    p.add_argument("--no-preemption", dest="preemption", action="store_false",
                   help="admit a request only when the pool can promise its whole length "
                        "(default: on its prompt's pages, preempting when pages run out)")
    p.add_argument("--warm-up", action="store_true",
                   help="compile every step shape before serving (else on first use)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start_process(args)
    import uvicorn

    from moe_relayfree_models import generation
    from moe_relayfree_models.serving.chat import ChatTemplate
    from moe_relayfree_models.serving.engine import Engine, EngineConfig
    from moe_relayfree_models.serving.server import Server
    try:
        cfg, tok, dispatch = prepare(args)
        try:
            template = ChatTemplate.from_folder(args.checkpoint, args.chat_template)
        except (OSError, ValueError) as e:
            raise SetupError(f"chat template: {e}") from None
        engine_config = EngineConfig(
            max_seqs=args.max_seqs, max_step_tokens=args.max_step_tokens, chunk=args.chunk,
            page_size=args.page_size, num_pages=args.num_pages, max_waiting=args.max_waiting,
            max_model_len=args.max_model_len, chunk_buckets=args.chunk_buckets,
            prefix_caching=args.prefix_caching, preemption=args.preemption)
        model = load(args, dispatch)
        engine = Engine(model, engine_config)
    except SetupError as e:
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"engine settings: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() != 0:  # process 0 decides every step; this one runs them
        engine.follow()
        return 0
    if args.warm_up:
        print(f"warm-up: {engine.warm_up()} step shapes compiled", file=sys.stderr, flush=True)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    server = Server(engine, tok, model_name=name,
                    stop_ids=generation.stop_token_ids(args.checkpoint, tok),
                    chat_template=template)
    http = GracefulServer(uvicorn.Config(server.app, host=args.host, port=args.port,
                                         log_level="warning", timeout_graceful_shutdown=60))
    http.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
