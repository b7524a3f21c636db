"""The knowledge base (chapter 15's sentence embeddings and retrieval-augmented generation): a BERT-family
sentence embedder, document ingestion and chunking, two stores (LanceDB, PostgreSQL + pgvector) and hybrid search.

    kb = KnowledgeBase.open()                 # $TORCHBOOK_HOME/knowledge/default, all-MiniLM-L6-v2
    kb.index(["notes/", "paper.pdf"])         # -> IndexReport
    kb.search("how do I ...", k=5, filters={"kind": "md"})   # -> [Hit(source, line, page, text, score)]
"""

from torchbook.knowledge.base import Hit, IndexReport, KnowledgeBase, open_store
from torchbook.knowledge.embedder import DEFAULT_EMBEDDER, Embedder

__all__ = ["DEFAULT_EMBEDDER", "Embedder", "Hit", "IndexReport", "KnowledgeBase", "open_store"]
