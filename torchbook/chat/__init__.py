"""The chatbot system (book chapter 15): conversations, memory, tools, retrieval and the orchestrator that runs
them around a model; the terminal (`torchbook chat`), the MCP server and the HTTP server all use it."""
