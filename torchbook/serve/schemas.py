"""The request bodies of the OpenAI API as torchbook serves it (pydantic models: FastAPI checks requests against
them and writes the OpenAPI description from them). Fields OpenAI defines that torchbook does not implement are
accepted only at their neutral value (the app answers 400 otherwise); unknown fields are ignored, as OpenAI's
clients send some that only OpenAI's servers use."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 4


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ImagePart(Schema):  # accepted by the schema so that the app can say why it refuses it
    type: Literal["image_url", "input_audio", "file", "refusal"]


class FunctionCall(Schema):
    name: str
    arguments: str


class ToolCall(Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(Schema):
    include_usage: bool = False


class Sampling(Schema):
    """The settings chat completions and completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class EmbeddingRequest(Schema):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
