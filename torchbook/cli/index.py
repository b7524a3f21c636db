"""`torchbook index PATH...`: add documents (.txt, .md, .html, .pdf; folders recursively) to a knowledge base.

Unchanged files are skipped, changed ones replaced, unreadable ones reported; `--delete` removes the given paths
from the base instead and `--prune` removes files that no longer exist. The base is `default` under
`$TORCHBOOK_HOME/knowledge` unless `--db` names another (a name, a folder, or `postgresql://...`).
"""

from __future__ import annotations

import argparse

NAME = "index"
HELP = "add documents to a knowledge base (or delete them) for `torchbook search` and the chatbot"


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    """--db and --embedder, shared with `torchbook search`."""
    parser.add_argument("--db", default=None,
                        help="knowledge base: a name under $TORCHBOOK_HOME/knowledge, a folder, or postgresql://...")
    parser.add_argument("--embedder", default=None,
                        help="the sentence-transformers/BERT folder that embeds (default: all-MiniLM-L6-v2); a base "
                             "is searched with the embedder it was built with")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", help="files and folders to index (or to delete with --delete)")
    add_base_arguments(parser)
    parser.add_argument("--delete", action="store_true", help="remove these files/folders from the base")
    parser.add_argument("--prune", action="store_true", help="remove files that no longer exist from the base")


def main(args: argparse.Namespace) -> int:
    from torchbook.errors import UserInputError
    from torchbook.knowledge import Embedder, KnowledgeBase

    if not args.paths and not args.prune:
        raise UserInputError("give files or folders to index (or --prune)")
    kb = KnowledgeBase.open(args.db, Embedder.load(args.embedder))
    if args.prune:
        for source in kb.prune():
            print(f"pruned {source}")
    if args.delete:
        removed = kb.delete(args.paths)
        for source in removed:
            print(f"deleted {source}")
        print(f"{len(removed)} files removed from {kb.store.location}")
        return 0
    if args.paths:
        report = kb.index(args.paths)
        print(f"{report.summary()} ({kb.store.location}, {kb.store.count()} chunks in all)")
    return 0
