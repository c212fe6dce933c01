"""The `seqrank` command line: convert, train, evaluate, export, serve, rank, ingest, embed, refresh."""
from __future__ import annotations

import argparse
import sys


def _csv(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def _count(text: str) -> int:
    """A whole number >= 0 (argparse names the option when this raises)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_count.__name__ = "count (a whole number >= 0)"  # argparse: "invalid count (a whole number >= 0) value: '-1'"


def _buckets(text: str) -> tuple[int, ...]:
    """Comma-separated candidate counts, positive and increasing."""
    from .serving.preprocess import check_buckets
    return check_buckets(int(b) for b in text.split(","))


_buckets.__name__ = "bucket list (increasing positive counts, e.g. 16,128,512,1024)"


def main(argv: list[str] | None = None) -> int:
    """The command line: one clear line and exit status 1 for bad data, a bad config or an unreachable server (the
    traceback only with --debug); 2 for bad arguments (argparse)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become a message
        if debug:
            raise
        print(f"seqrank: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="seqrank", description=__doc__)
    parser.add_argument("--version", action="version", version=f"seqrank {__version__}")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="logging level for every command (default info)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="an events file -> a Parquet dataset bucketed by user, for logs larger "
                       "than memory (docs/training-at-scale.md)")
    p.add_argument("--events", required=True, help="events file (any format train reads)")
    p.add_argument("--out", required=True, help="the dataset directory to write (new or empty)")
    p.add_argument("--buckets", type=int, default=64, help="user hash buckets; a worker count must divide it "
                   "(default 64)")
    p.add_argument("--chunk-rows", type=int, default=250_000, help="source rows read at a time: memory grows "
                   "with it, about 450 bytes a row (default 250000)")

    p = sub.add_parser("train", help="learn PinnerFormer and the TransAct ranker from an events file")
    p.add_argument("--events", required=True, help="events file (canonical CSV/TSV/Parquet, KuaiRand, OTTO jsonl, "
                   "MovieLens) or a dataset directory written by seqrank convert")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--negative-actions", type=_csv, default=None, help="comma-separated negative actions, e.g. hate")
    p.add_argument("--config", default=None, help="JSON run config (see seqrank/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set data.split=validation --set transact.epochs=4")

    p = sub.add_parser("evaluate", help="time-based evaluation; writes RUN/metrics.json")
    p.add_argument("--run", required=True, help="a trained run directory (seqrank train --out)")
    p.add_argument("--seeds", default=None, help="e.g. 0,1,2: also train every ranker with these seeds and report "
                   "each head's AUC mean +- sd (seed variance)")
    p.add_argument("--user-folds", type=int, default=1, help="K > 1: also cross-validate PinnerFormer over K folds "
                   "of users, so dense vs next-action is measured on every user (trains 2 (K - 1) more PinnerFormers)")
    p.add_argument("--refreshes", type=_count, default=8, help="score each test request with the item rows the daily "
                   "`seqrank refresh` learned before it: at most this many refreshes over the test period (daily "
                   "when it has no more days); 0: the training vocabulary throughout")

    p = sub.add_parser("export", help="ONNX + parity check + lookup tables -> a Triton model repository")
    p.add_argument("--run", required=True, help="a trained run directory")
    p.add_argument("--repository", default=None, help="output model repository (default RUN/model_repository)")
    p.add_argument("--candidate-buckets", type=_buckets, default=None, help="the candidate counts preprocess pads "
                   "a request to, one TensorRT profile each: a GPU batches only requests of one bucket, so choose "
                   "them for your request mix (research/bucket_batching.py; default: "
                   "seqrank.serving.preprocess.CANDIDATE_BUCKETS); the last is the most a request may send")

    p = sub.add_parser("serve", help="run the real tritonserver on a model repository (Ctrl-C stops it)")
    p.add_argument("--repository", required=True, help="an exported model repository (seqrank export)")
    p.add_argument("--store", default=None, help="feature store URL for preprocess (sqlite:///... or redis://...)")
    p.add_argument("--gpu", action="store_true", help="load config.pbtxt (GPU) instead of configs/cpu.pbtxt")
    for name, port in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        p.add_argument(f"--{name}-port", type=int, default=port, help=f"{name} port (default {port}; 0: a free one)")
    p.add_argument("--bind-address", default="127.0.0.1", help="address the server listens on (default 127.0.0.1)")
    p.add_argument("--admin-key-env", default=None,
                   help="environment variable with the key that unlocks the restricted admin APIs")
    p.add_argument("--supervise", action="store_true",
                   help="run a canary ranking every --canary-interval seconds and restart the server (same ports) "
                        "when it dies, a Python stub dies or the canary keeps failing (docs/operations.md)")
    p.add_argument("--canary-interval", type=float, default=1.0, metavar="S", help="with --supervise (default 1)")
    p.add_argument("--canary-timeout", type=float, default=5.0, metavar="S", help="with --supervise (default 5)")
    p.add_argument("--failures-before-restart", type=int, default=2, metavar="N",
                   help="with --supervise: consecutive failed canaries that trigger a restart (default 2)")
    p.add_argument("--events-file", default=None,
                   help="with --supervise: JSON-lines file of incidents and restarts (default: a temporary file)")

    p = sub.add_parser("rank", help="rank candidates for a user through the served ensemble")
    p.add_argument("--user-id", required=True, help="the user to rank for")
    p.add_argument("--candidates", required=True, type=_csv, help="comma-separated candidate item ids (1 to 1024)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="default grpc")
    p.add_argument("--url", default=None, help="server address (default 127.0.0.1:8001 gRPC, :8000 HTTP)")
    p.add_argument("--top-k", type=int, default=None, help="return only the best K candidates")
    p.add_argument("--request-time-ms", type=int, default=None, help="only actions before it count (default: now)")
    p.add_argument("--actions", default=None,
                   help="the user's recent actions as item:action:timestamp_ms,... (default: the feature store)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt (default 5)")

    p = sub.add_parser("embed", help="daily batch: every user's PinnerFormer embedding from today's actions -> store")
    p.add_argument("--run", required=True, help="the trained run (its PinnerFormer and vocabulary)")
    p.add_argument("--store", default=None, help="feature store URL (default: $SEQRANK_STORE, which keeps a "
                   "password out of the command line)")
    p.add_argument("--events", default=None, help="embed the users of this events file instead of every user "
                   "with actions in the store")
    p.add_argument("--as-of-ms", type=int, default=None, help="only actions before it (default: the newest + 1)")

    p = sub.add_parser("refresh", help="learn rows for items first seen after training and publish them as a new "
                                       "model version (docs/operations.md)")
    p.add_argument("--run", required=True, help="the trained run the repository was exported from")
    p.add_argument("--events", default=None, help="an events file, or 'store' for every user's actions in the store")
    p.add_argument("--store", default=None, help="with --events store: feature store URL (default: $SEQRANK_STORE)")
    p.add_argument("--repository", required=True, help="the served model repository (new versions are added to it)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps at most (default 2000)")
    p.add_argument("--max-seconds", type=float, default=None, help="training seconds at most (default 900)")
    p.add_argument("--server", dest="servers", action="append", default=[], metavar="HOST:PORT",
                   help="a running tritonserver (HTTP, model control mode explicit) that loads the new version, "
                        "ranker first; repeat for several")
    p.add_argument("--admin-key-env", default=None,
                   help="with --server: environment variable holding the admin key of the repository API")
    p.add_argument("--rollback", action="store_true",
                   help="instead: take the newest refreshed version back (preprocess first, then the ranker)")

    sub.add_parser("ingest", help="load user actions into the feature store (see seqrank ingest --help)",
                   add_help=False)

    return parser


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    import logging
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command != "train":
        from .distributed import launched
        if launched():  # every process would write the same files
            parser.error(f"only `seqrank train` runs under torchrun (WORLD_SIZE is set); run `seqrank {args.command}` "
                         "as one process")
    if args.command == "ingest":
        from .ingest import main_ingest
        return main_ingest(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "export":
        from .exporting import export_run
        export_run(args.run, args.repository, candidate_buckets=args.candidate_buckets)
    elif args.command == "serve":
        import os
        from pathlib import Path
        from .server.triton import ServerOptions, serve_forever
        key = os.environ.get(args.admin_key_env) if args.admin_key_env else None
        if args.admin_key_env and not key:  # asked for a restriction: never start open by accident
            parser.error(f"environment variable {args.admin_key_env} is empty or unset")
        options = ServerOptions(Path(args.repository), args.http_port, args.grpc_port, args.metrics_port,
                                model_config_name=None if args.gpu else "cpu", restricted_api_key=key,
                                env={"SEQRANK_STORE": args.store} if args.store else {},
                                bind_address=args.bind_address)
        if args.supervise:
            from .server.supervise import supervise
            return supervise(options, interval_s=args.canary_interval,
                             failures_before_restart=args.failures_before_restart,
                             canary_timeout_s=args.canary_timeout,
                             events_path=Path(args.events_file) if args.events_file else None)
        return serve_forever(options)
    elif args.command == "rank":
        return _rank(args)
    elif args.command == "embed":
        from .embed_job import write_embeddings
        import os
        store = args.store or os.environ.get("SEQRANK_STORE")
        if not store:
            parser.error("embed needs --store or $SEQRANK_STORE")
        write_embeddings(args.run, store, args.as_of_ms, args.events)
    elif args.command == "convert":
        from .data.parquet_events import convert_events
        ds = convert_events(args.events, args.out, args.buckets, chunk_rows=args.chunk_rows)
        print(f"{ds.meta['n_events']} events of {ds.meta['n_users']} users ({ds.meta['duplicates_dropped']} "
              f"duplicate rows dropped) -> {ds.directory} ({ds.n_buckets} buckets)")
    elif args.command == "refresh":
        return _refresh(parser, args)
    elif args.command == "train":
        from .distributed import process_group
        from .pipeline import train
        with process_group():  # under torchrun: data-parallel over its processes (docs/training-at-scale.md)
            train(args.events, args.out, args.config, args.negative_actions, args.overrides)
    elif args.command == "evaluate":
        from .evaluation import evaluate
        evaluate(args.run, [int(x) for x in args.seeds.split(",")] if args.seeds else None, args.user_folds,
                 args.refreshes)
    return 0


def _refresh(parser, args) -> int:
    import os
    key = None
    if args.admin_key_env:
        key = os.environ.get(args.admin_key_env)
        if not key:
            parser.error(f"environment variable {args.admin_key_env} is empty or unset")
    if args.events is None and not args.rollback:
        parser.error("refresh needs --events FILE or --events store (or --rollback)")
    url = args.store or os.environ.get("SEQRANK_STORE")
    if args.events == "store" and not url:
        parser.error("refresh --events store needs --store or $SEQRANK_STORE")
    from .embed_job import todays_actions
    from .refresh import DEFAULT_MAX_SECONDS, DEFAULT_MAX_STEPS, refresh, rollback
    if args.rollback:
        rollback(args.run, args.repository, args.servers, key)
        return 0
    if args.events == "store":
        from .store import open_store
        with open_store(url, timeout_s=5.0) as store:
            actions = todays_actions(store=store)
    else:
        actions = todays_actions(args.events)
    refresh(args.run, args.repository, actions,
            max_steps=DEFAULT_MAX_STEPS if args.max_steps is None else args.max_steps,
            max_seconds=DEFAULT_MAX_SECONDS if args.max_seconds is None else args.max_seconds,
            servers=args.servers, admin_key=key)
    return 0


def _rank(args) -> int:
    from .client import RankingClient
    actions = None
    if args.actions:
        actions = []
        for part in _csv(args.actions):
            item, action, ts = part.rsplit(":", 2)
            actions.append((item, action, int(ts)))
    with RankingClient(args.url, protocol=args.protocol, timeout_s=args.timeout) as client:
        result = client.rank(args.user_id, args.candidates, actions, args.request_time_ms, args.top_k)
        heads = client.heads
    print(f"user {args.user_id} ({args.protocol}, sequence from {result.sequence_source}, "
          f"embedding from {result.embedding_source})")
    print(f"{'rank':>4} {'item':>12} {'utility':>8} " + " ".join(f"{h[:9]:>9}" for h in heads))
    for i, item in enumerate(result.items, 1):
        flag = " (oov)" if item.oov else ""
        print(f"{i:>4} {item.item_id:>12} {item.utility:>8.4f} "
              + " ".join(f"{item.scores[h]:>9.4f}" for h in heads) + flag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
