"""Structured output (book chapter 15): constrained decoding, so that a model cannot write output that breaks a JSON
Schema, a regular expression, a list of choices or a context-free grammar.

A `Constraint` says what the output must be; `constraint_processor(constraint, tokenizer, end_ids)` checks it
against the model's vocabulary (an unsupported schema keyword, a bad regular expression, a grammar that does not
parse, a vocabulary that cannot spell the output: a `UserInputError` before any decoding) and returns a
`ConstraintProcessor`, a logits processor for the serving engine (`Request.processors`). At every step it sets the
logits of the tokens that cannot continue a valid output to -inf; the end tokens are allowed only once the output
is complete, and once nothing more can follow (the closing brace of an object) only they are, so a finished
choice ("stop") always parses and validates. A choice cut by `max_tokens` ends with "length": incomplete, never
valid (`processor.complete` says so too). Each choice of a request gets its own copy (`fork`), so requests with
different constraints, or none, share a batch.

The token masks come from llguidance (the Guidance project's Rust engine, also in llama.cpp, vLLM and SGLang): a
lexer/parser split that computes a mask for a 49k-token vocabulary in tens of microseconds, the widest JSON Schema
coverage of the libraries compared (benchmarks/structured.py, docs/structured.md: llguidance, xgrammar,
outlines-core), Lark grammars with embedded JSON schemas (`%json {...}`, which the tool-call constraints use), and
GBNF converted to Lark. Tokenizers: any Hugging Face `tokenizers` vocabulary llguidance reads from tokenizer.json
(byte-level BPE as GPT-2's and SmolLM2's, SentencePiece-style byte fallback as Llama 2's and Mistral's, and
torchbook's own `train_bpe`); a character vocabulary that cannot write the characters a constraint needs (char-rnn's)
is an error naming them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchbook.errors import UserInputError
from torchbook.generate.tool_calls import STYLES, Tool, tools_from_openai

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json", "regex", "choices", "grammar", "tool_calls")
# At most one space between JSON tokens: llguidance's default allows any run of whitespace, in which small models
# loop ("{\r\r\r..." until max_tokens). A schema's own "x-guidance" options override it.
JSON_OPTIONS: Any = {"whitespace_pattern": "[ ]?"}  # llguidance.JsonCompileOptions
# Characters any JSON output needs; a vocabulary that cannot write one of them cannot follow a JSON constraint.
JSON_CHARACTERS = '{}[]":,0123456789.-truefalsn'


@dataclass(frozen=True)
class Constraint:
    """What the output must be. `kind`: "json_schema" (`value`: the schema, a dict or its JSON text), "json" (any
    JSON value; an object with `value="object"`), "regex" (`value`: a pattern the whole output matches, Rust regex
    syntax: no look-around or back-references), "choices" (`value`: the strings, one of which is the output),
    "grammar" (`value`: a Lark grammar as llguidance reads it, or GBNF as llama.cpp's, recognised by its `::=`)."""

    kind: str
    value: Any = None

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        return cls("json_schema", schema)

    @classmethod
    def any_json(cls, object_only: bool = False) -> Constraint:
        return cls("json", "object" if object_only else None)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choices(cls, options: Sequence[str]) -> Constraint:
        return cls("choices", tuple(options))

    @classmethod
    def grammar(cls, text: str) -> Constraint:
        return cls("grammar", text)

    @classmethod
    def tool_calls(cls, tools: Sequence[dict[str, Any] | Tool], style: str = "hermes",
                   name: str | None = None) -> Constraint:
        """One or more calls of the declared tools (OpenAI's `tool_choice: "required"`), or exactly one call of
        the tool `name` (a named function), in the model family's format (`tool_calls.STYLES`), each call's
        arguments valid under its tool's parameters schema. Parse the output with `tool_calls.parse_tool_calls`."""
        parsed = tools_from_openai(tools)
        if not parsed:
            raise UserInputError("a tool call is required but no tools are declared", param="tools")
        if style not in STYLES:
            raise UserInputError(f"unknown tool-call style {style!r}; accepted: {', '.join(STYLES)}", param="style")
        if name is not None and name not in {t.name for t in parsed}:
            raise UserInputError(f"tool_choice names {name!r}, which is not among the declared tools",
                                 param="tool_choice")
        return cls("tool_calls", (tuple(json.dumps(t.to_openai(), sort_keys=True) for t in parsed), style, name))

    def describe(self) -> str:
        return {"json_schema": "the JSON schema", "json": "JSON", "regex": "the regular expression",
                "choices": "the choices", "grammar": "the grammar", "tool_calls": "the tools' schemas"}.get(self.kind, self.kind)


def json_schema_of(value: dict[str, Any] | str) -> dict[str, Any]:
    """A schema given as a dict or JSON text, as a dict (an error naming the JSON problem otherwise)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserInputError(f"the JSON schema is not JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                                 param="json_schema") from None
    if not isinstance(value, dict):
        raise UserInputError(f"a JSON schema must be an object, got {type(value).__name__}", param="json_schema")
    return value


def check_json_schema(schema: dict[str, Any]) -> None:
    """An invalid schema (against its metaschema, Draft 2020-12 unless it names another) is an error."""
    import jsonschema  # an optional dependency (the structured extra)

    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise UserInputError(f"the JSON schema is invalid: {e.message}" + (f" (at {where})" if where else ""),
                             param="json_schema") from None


def grammar_text(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar (checked later against the vocabulary)."""
    from llguidance import LLMatcher  # an optional dependency (the structured extra)

    kind, value = constraint.kind, constraint.value
    if kind == "json_schema":
        schema = json_schema_of(value)
        check_json_schema(schema)
        return str(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
    if kind == "json":
        return str(LLMatcher.grammar_from_json_schema({"type": "object"} if value == "object" else {},
                                                      defaults=JSON_OPTIONS))
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise UserInputError("the regular expression is empty", param="regex")
        return str(LLMatcher.grammar_from_regex(value))
    if kind == "choices":
        options = [str(o) for o in (value or ())]
        if not options or any(not o for o in options):
            raise UserInputError("give at least one choice, none of them empty", param="choices")
        return str(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options) + "\n"))
    if kind == "tool_calls":
        return str(LLMatcher.grammar_from_lark(tool_call_grammar(*value)))
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise UserInputError("the grammar is empty", param="grammar")
        return str(LLMatcher.grammar_from_lark(gbnf_to_lark(value) if "::=" in value else value))
    raise UserInputError(f"unknown constraint kind {kind!r}; accepted: {', '.join(KINDS)}", param="constraint")


def tool_call_grammar(tools: Sequence[str], style: str, name: str | None) -> str:
    """The Lark grammar of tool calls (`Constraint.tool_calls`; `tools` as JSON texts): each call's arguments an
    embedded JSON schema (`%json`), the format the family's template teaches: Hermes/Qwen `<tool_call>` blocks
    (one per line), Llama 3 `{"name", "parameters"}` objects joined by "; ", Mistral `[TOOL_CALLS]` and a JSON
    list (written as text: a Mistral vocabulary's special token is not used)."""
    parsed = [Tool.from_openai(json.loads(t)) for t in tools]
    chosen = [t for t in parsed if name is None or t.name == name]
    key = "parameters" if style == "llama3" else "arguments"
    rules = []
    for i, tool in enumerate(chosen):
        check_json_schema(tool.parameters)
        schema = {**tool.parameters, "x-guidance": {**JSON_OPTIONS, **tool.parameters.get("x-guidance", {})}}
        head = json.dumps(f'{{"name": {json.dumps(tool.name)}, "{key}": ')
        rules.append(f"call{i}: {head} args{i} \"}}\"\nargs{i}: %json {json.dumps(schema)}")
    body = "body: " + " | ".join(f"call{i}" for i in range(len(chosen)))
    many = name is None
    if style == "hermes":
        start = 'start: block ("\\n" block)*' if many else "start: block"
        top = f'{start}\nblock: "<tool_call>\\n" body "\\n</tool_call>"'
    elif style == "llama3":
        top = 'start: body ("; " body)*' if many else "start: body"
    else:
        top = 'start: "[TOOL_CALLS][" body (", " body)* "]"' if many else 'start: "[TOOL_CALLS][" body "]"'
    return "\n".join([top, body, *rules]) + "\n"


def gbnf_to_lark(text: str) -> str:
    """A llama.cpp GBNF grammar in llguidance's Lark (its own converter), with an error naming what it rejects."""
    from llguidance.gbnf_to_lark import gbnf_to_lark as convert  # an optional dependency

    try:
        return str(convert(text))
    except Exception as e:  # the converter raises plain exceptions on a grammar it cannot read
        raise UserInputError(f"the GBNF grammar does not parse: {e}", param="grammar") from None


_PARAMS = {"tool_calls": "tools", "json_schema": "json_schema", "json": "response_format", "regex": "regex", "choices": "choices",
           "grammar": "grammar"}
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


def explain(error: str, constraint: Constraint) -> str:
    """llguidance's error as one line that names the unsupported keyword or the bad part."""
    first = error.strip().splitlines()[0] if error.strip() else "rejected"
    unimplemented = _UNIMPLEMENTED.search(error)
    if unimplemented:
        keys = [k.strip().strip('"') for k in unimplemented.group(1).split(",")]
        return (f"the JSON schema uses the unsupported keyword{'s' if len(keys) > 1 else ''} {', '.join(keys)}; "
                "constrained decoding supports type, properties, required, additionalProperties, items, "
                "prefixItems, minItems, maxItems, enum, const, anyOf, oneOf, allOf, $ref/$defs, minLength, "
                "maxLength, pattern, format, minimum, maximum, exclusiveMinimum, exclusiveMaximum and multipleOf")
    if "regex parse error" in error:
        detail = [line.strip() for line in error.splitlines() if line.strip().startswith("error:")]
        reason = detail[0][len("error:"):].strip() if detail else first
        return f"{constraint.describe()} holds a regular expression llguidance cannot use: {reason}"
    return f"{constraint.describe()} cannot be used for constrained decoding: {' '.join(error.split())}"


# -- vocabularies ------------------------------------------------------------------------------------------------
_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Any]] = {}
_MATCHERS: dict[tuple[int, str], Any] = {}
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any, end_ids: Sequence[int], vocab_size: int | None = None) -> Any:
    """llguidance's view of a Hugging Face `tokenizers.Tokenizer` (built once per tokenizer, about a second for a
    49k vocabulary; cached). `end_ids` are the tokens allowed once the output is complete."""
    from llguidance import LLTokenizer, TokenizerWrapper  # an optional dependency (the structured extra)

    if not hasattr(tokenizer, "to_str"):
        raise UserInputError(f"constrained decoding needs a Hugging Face tokenizers vocabulary, not a "
                             f"{type(tokenizer).__name__}", param="model")
    size = vocab_size or tokenizer.get_vocab_size(with_added_tokens=True)
    ends = tuple(int(e) for e in end_ids)
    key = (id(tokenizer), size, ends)
    with _LOCK:
        if key in _TOKENIZERS:
            return _TOKENIZERS[key][1]
    # llguidance needs an end token; a model without one gets an id past its vocabulary, trimmed off the mask
    eos = list(ends) if ends else [size]
    try:
        built = LLTokenizer(tokenizer.to_str(), n_vocab=size if ends else size + 1, eos_token=eos)
    except Exception as e:  # llguidance reads byte-level and byte-fallback tokenizer.json files, not every layout
        log.info("llguidance cannot read the tokenizer (%s): its tokens as decoded text instead", e)
        n = size if ends else size + 1
        built = LLTokenizer(TokenizerWrapper(_DecodedVocabulary(tokenizer, n, eos[0])), n_vocab=n, eos_token=eos)
    with _LOCK:
        _TOKENIZERS[key] = (tokenizer, built)  # the tokenizer is kept so that its id stays its own
    return built


class _DecodedVocabulary:
    """A vocabulary llguidance cannot read from tokenizer.json (a character-level one: char-rnn's) given to it as
    each token's decoded text, the interface `llguidance.TokenizerWrapper` wraps."""

    def __init__(self, tokenizer: Any, size: int, eos: int):
        self.tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = eos, None
        self.tokens = [tokenizer.decode([i]).encode() if i < tokenizer.get_vocab_size() else b""
                       for i in range(size)]
        self.special_token_ids: list[int] = []

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


def check_vocabulary(tokenizer: Any, constraint: Constraint) -> None:
    """A vocabulary that cannot write characters a JSON constraint needs (a character-level one trained on text
    without braces, like char-rnn's) is an error naming them. Byte-level and byte-fallback vocabularies write
    anything."""
    if constraint.kind not in ("json_schema", "json"):
        return
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    if "<0x7B>" in vocab or "{" in vocab or "Ġ{" in vocab:  # byte fallback, or a byte-level vocabulary's brace
        return
    written = set("".join(tokenizer.decode([i]) for i in vocab.values()))
    missing = sorted(set(JSON_CHARACTERS) - written)
    if missing:
        raise UserInputError(f"this model's vocabulary cannot write {''.join(missing)!r}, which JSON needs; "
                             "constrained decoding needs a vocabulary that can spell any text (byte-level BPE or "
                             "byte fallback)", param="model")


# -- the processor ---------------------------------------------------------------------------------------------
class ConstraintProcessor:
    """A logits processor (`torchbook.generate.sampling.LogitsProcessor`) that keeps a choice inside a constraint.

    It follows the choice's generated tokens (`tokens[prompt_len:]`) through an llguidance matcher and sets the
    logits of every token the matcher forbids to -inf; the end tokens are allowed once the output is complete.
    `complete(generated)`: the output so far is a whole valid output; `finished(generated)`: nothing more can follow
    (the engine ends the choice, "stop", even when the model has no end token); `fork()`: a fresh copy for another
    choice (the engine forks each choice's own)."""

    def __init__(self, matcher: Any, end_ids: Sequence[int], constraint: Constraint, vocab_size: int):
        self._pristine = matcher
        self.matcher = matcher.deep_copy()
        self.end_ids = [int(e) for e in end_ids]
        self.constraint = constraint
        self.vocab_size = vocab_size
        self.consumed = 0
        self.error: str | None = None

    def fork(self) -> ConstraintProcessor:
        return ConstraintProcessor(self._pristine, self.end_ids, self.constraint, self.vocab_size)

    def _follow(self, generated: Sequence[int]) -> None:
        """Consume the generated tokens the matcher has not seen yet (the end token is never consumed)."""
        for token in generated[self.consumed:]:
            if token in self.end_ids:
                break
            if not self.matcher.consume_token(int(token)) and self.error is None:
                self.error = self.matcher.get_error() or f"token {token} broke {self.constraint.describe()}"
                log.warning("constrained decoding: %s", self.error)
            self.consumed += 1

    def allowed(self) -> Tensor:
        """The tokens allowed next, as a boolean vector (vocab_size,). After an error (a dead end no token
        continues, which byte-level and byte-fallback vocabularies never meet) only the end tokens are."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        allowed = allowed[: self.vocab_size].bool()
        if self.matcher.is_error() or self.error is not None:
            allowed[:] = False
            allowed[[e for e in self.end_ids if e < self.vocab_size]] = True
        return allowed

    def __call__(self, logits: Tensor, tokens: Tensor, prompt_len: int) -> Tensor:
        self._follow(tokens[0, prompt_len:].tolist())
        allowed = self.allowed()
        width = logits.size(-1)
        if allowed.numel() < width:
            allowed = torch.cat([allowed, allowed.new_zeros(width - allowed.numel())])
        return logits.masked_fill(~allowed[:width].to(logits.device)[None], float("-inf"))

    def complete(self, generated: Sequence[int]) -> bool:
        """The generated tokens (end token or not) are a whole output the constraint accepts."""
        self._follow(generated)
        return self.error is None and bool(self.matcher.is_accepting())

    def finished(self, generated: Sequence[int]) -> bool:
        """Nothing can follow the generated tokens but an end token: the choice is over."""
        self._follow(generated)
        return self.error is None and bool(self.matcher.is_stopped())


def constraint_processor(constraint: Constraint, tokenizer: Any, end_ids: Sequence[int] = (),
                         vocab_size: int | None = None) -> ConstraintProcessor:
    """A processor keeping output inside `constraint` for a model with this tokenizer; `end_ids`: the tokens that
    end a choice (`Loaded.meta["end_token_ids"]`); `vocab_size`: the model's (its logits' width). Raises
    `UserInputError` naming the problem (an unsupported keyword, a bad pattern, a vocabulary that cannot write the
    output) before any decoding. Compiled grammars are cached: the same constraint again costs a copy."""
    from llguidance import LLMatcher  # an optional dependency (the structured extra)

    text = grammar_text(constraint)
    check_vocabulary(tokenizer, constraint)
    ll = ll_tokenizer(tokenizer, end_ids, vocab_size)
    key = (id(ll), text)
    with _LOCK:
        matcher = _MATCHERS.get(key)
    if matcher is None:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(text, ll)
        if is_error:
            raise UserInputError(explain(messages[0] if messages else "", constraint),
                                 param=_PARAMS.get(constraint.kind, "constraint"))
        matcher = LLMatcher(ll, text, log_level=0)
        if matcher.is_error():
            raise UserInputError(explain(matcher.get_error(), constraint), param=_PARAMS.get(constraint.kind))
        with _LOCK:
            _MATCHERS[key] = matcher
    processor = ConstraintProcessor(matcher, end_ids, constraint, vocab_size or ll.vocab_size)
    if not bool(processor.allowed().any()):
        raise UserInputError(f"this model's vocabulary cannot write the start of any output {constraint.describe()} "
                             "allows", param="model")
    return processor
