"""The chatbot end to end on the offline SmolLM2-135M-Instruct (plumbing only: the orchestrator, the engine, the
template, the tools and the knowledge base together): the book's calculator question answered with 42, and a
question answered from an indexed document with its source cited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from torchbook.chat.model import ChatModel
from torchbook.chat.orchestrator import Orchestrator
from torchbook.chat.tools import builtin_tools

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def model() -> Iterator[ChatModel]:
    model = ChatModel.load(context=1024, slots=1)
    yield model
    model.close()


def test_smollm2_answers_the_books_calculator_question_with_42(model: ChatModel) -> None:
    reply = Orchestrator(model, builtin_tools(web_tools=False), max_tokens=32).respond(
        [{"role": "user", "content": "What is 525.6 * 315 / 3942?"}])
    assert reply.messages[0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert "42" in reply.text, reply.text


def test_smollm2_answers_from_an_indexed_document_and_cites_it(model: ChatModel, tmp_path: Path) -> None:
    from torchbook.knowledge import Embedder, KnowledgeBase

    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "kestrel.md"
    doc.write_text("# Project Kestrel\n\nProject Kestrel is our bird-survey app.\n\n"
                   "The launch code of Project Kestrel is AZURE-7.\n")
    (tmp_path / "docs" / "otters.md").write_text("# Otters\n\nSea otters hold hands while they sleep.\n")
    kb = KnowledgeBase.open(str(tmp_path / "kb"), Embedder.load())
    kb.index([tmp_path / "docs"])
    reply = Orchestrator(model, builtin_tools(kb=kb, web_tools=False), kb_k=1, max_tokens=48).respond(
        [{"role": "user", "content": "What is the launch code of Project Kestrel?"}])
    assert "AZURE-7" in reply.messages[-1]["content"], reply.text
    assert reply.sources == [f"{doc.resolve()}:1"] and reply.text.endswith(f"Sources: [1] {doc.resolve()}:1")
