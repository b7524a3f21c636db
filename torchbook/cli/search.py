"""`torchbook search "question" [--k 5] [--filter kind=md] [--mode hybrid]`: the best chunks of a knowledge base,
each with its citation (source:line, or source p.N for a PDF)."""

from __future__ import annotations

import argparse
import json

from torchbook.cli.index import add_base_arguments

NAME = "search"
HELP = "search a knowledge base (hybrid: vectors + BM25, fused by reciprocal rank)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="+", help="what to look for")
    parser.add_argument("--k", type=int, default=5, help="how many hits (default 5)")
    parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                        help="keep hits whose source or kind matches (shell patterns allowed), e.g. kind=md, "
                             "source='*/notes/*'; repeatable")
    parser.add_argument("--mode", default="hybrid", help="hybrid (default), vector or bm25")
    add_base_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the hits as JSON lines")


def main(args: argparse.Namespace) -> int:
    from torchbook.errors import UserInputError
    from torchbook.knowledge import Embedder, KnowledgeBase

    filters = {}
    for item in args.filter:
        field, sep, value = item.partition("=")
        if not sep:
            raise UserInputError(f"--filter {item!r} must be FIELD=VALUE (fields: source, kind)")
        filters[field.strip()] = value.strip()
    kb = KnowledgeBase.open(args.db, Embedder.load(args.embedder))
    hits = kb.search(" ".join(args.query), k=args.k, filters=filters, mode=args.mode)
    for rank, hit in enumerate(hits, start=1):
        if args.json:
            print(json.dumps({"rank": rank, "citation": hit.citation, "source": hit.source, "line": hit.line,
                              "page": hit.page, "chunk": hit.chunk, "score": hit.score, "text": hit.text}))
        else:
            print(f"[{rank}] {hit.citation}  (score {hit.score:.4f})")
            print("    " + " ".join(hit.text.split())[:300])
    if not hits:
        print("no hits")
    return 0
