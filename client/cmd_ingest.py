"""``python -m client ingest count|topics|query|stats``: read back what the ingest service stored.

    python -m client ingest count                    # records in every topic
    python -m client ingest count load               # in one topic
    python -m client ingest topics
    python -m client ingest query load --after-id 0 --limit 10   # JSON lines: {"id": .., "record": ..}
    python -m client ingest stats

Each takes ``--service`` (default ``ingest``), ``--config``, ``--host``, ``--port``, ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import EXIT_OK, add_connection_options, connect_from_args


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--service", default="ingest", help="service name in the config (default: %(default)s)"
    )
    add_connection_options(parser)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = sub.add_parser("ingest", help="read back what the ingest service stored (count, query, stats)")
    actions = ingest.add_subparsers(dest="ingest_action", required=True, metavar="ACTION")

    count = actions.add_parser("count", help="how many records are stored (in one topic or all)")
    count.add_argument("topic", nargs="?", help="count only this topic (default: every topic)")
    count.set_defaults(func=cmd_count)

    topics = actions.add_parser("topics", help="list the topics with stored records")
    topics.set_defaults(func=cmd_topics)

    query = actions.add_parser("query", help="print stored records of a topic as JSON lines")
    query.add_argument("topic")
    query.add_argument("--after-id", type=int, default=0, help="only records with a larger id (default: 0)")
    query.add_argument("--limit", type=int, default=100, help="at most this many, 1-10000 (default: 100)")
    query.set_defaults(func=cmd_query)

    stats = actions.add_parser("stats", help="totals: records, batches, rejects, dropped, duplicates, bytes")
    stats.set_defaults(func=cmd_stats)

    for parser in (count, topics, query, stats):
        _add_target(parser)


def cmd_count(args: argparse.Namespace) -> int:
    with connect_from_args(args) as conn:
        print(conn.root.count(args.topic))
    return EXIT_OK


def cmd_topics(args: argparse.Namespace) -> int:
    with connect_from_args(args) as conn:
        for topic in conn.root.topics():
            print(topic)
    return EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    with connect_from_args(args) as conn:
        rows = conn.root.query(args.topic, args.after_id, args.limit)
    for record_id, data in rows:
        print(f'{{"id": {record_id}, "record": {data}}}')
    if len(rows) == args.limit:
        print(f"(more may follow: --after-id {rows[-1][0]})", file=sys.stderr)
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with connect_from_args(args) as conn:
        totals = dict(conn.root.stats())
    print(json.dumps(totals, indent=2))
    return EXIT_OK
