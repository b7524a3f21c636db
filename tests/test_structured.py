"""Constrained decoding: every finished output parses and validates (property-based over many schemas, on
byte-level BPE, byte-fallback SentencePiece-style and torchbook's own vocabularies), the engine's batches mix
constraints, truncation says "length", bad schemas fail before decoding naming the keyword, and SmolLM2 finishes
valid JSON for a fixed set of schemas and prompts."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from torchbook.data.tokenizers import char_tokenizer, train_bpe
from torchbook.errors import UserInputError
from torchbook.generate.constraints import Constraint, ConstraintProcessor, constraint_processor
from torchbook.generate.sampling import SamplingConfig
from torchbook.generate.serving import Engine, Request
from torchbook.generate.tool_calls import parse_tool_calls
from torchbook.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ['{"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "none": null, "score": -1.5e3}',
        "The quick brown fox jumps over the lazy dog.", "hello world 0123456789 2024-05-17 ada@example.org"] * 3


# -- vocabularies ------------------------------------------------------------------------------------------------
def gpt2_style() -> tuple[Tokenizer, list[int]]:
    """A tiny byte-level BPE as GPT-2's (and SmolLM2's): the 256 bytes as printable characters, then merges."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXT, trainer)
    return tokenizer, [tokenizer.token_to_id("<|endoftext|>")]


def sentencepiece_style() -> tuple[Tokenizer, list[int]]:
    """A tiny byte-fallback vocabulary as Llama 2's and Mistral's tokenizer.json: <unk> <s> </s>, the 256 byte
    tokens <0x00>..<0xFF>, a few "▁" pieces and merges; spaces written as "▁"; decoded with Replace, ByteFallback,
    Fuse, Strip."""
    specials = ["<unk>", "<s>", "</s>"]
    merges = [("▁", "t"), ("t", "h"), ("▁t", "he"), ("h", "e"), ("▁", "a"), ("n", "a"), ("m", "e"), ("▁", '"'),
              ('"', ":"), ("▁", "{"), ("{", '"'), ('"', "}"), ("e", "x"), ("a", "m")]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{i:02X}>" for i in range(256)])}
    for a, b in merges:
        for piece in (a, b, a + b):
            vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(specials)
    return tokenizer, [2]


def torchbook_bpe() -> tuple[Tokenizer, list[int]]:
    """torchbook's own tokenizer (chapter 14's `train_bpe`: byte fallback, "▁" for spaces)."""
    tokenizer = train_bpe(TEXT, vocab_size=400, min_frequency=1, prepend_space=False)
    return tokenizer, [tokenizer.token_to_id("</s>")]


VOCABULARIES = {"gpt2": gpt2_style(), "sentencepiece": sentencepiece_style(), "torchbook": torchbook_bpe()}


def validator(schema: dict) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


# -- random walks through a constraint (no model: random logits, the processor, the engine's choice rule) --------
def walk(processor: ConstraintProcessor, tokenizer: Tokenizer, ends: list[int], generator: torch.Generator,
         max_tokens: int = 64) -> tuple[str, str]:
    """Random logits, pushed towards closing characters so that outputs end, through the processor; the text and
    the finish reason the engine would give ("stop": an end token or a closed constraint; "length")."""
    processor = processor.fork()
    vocab = tokenizer.get_vocab_size()
    prefer = torch.zeros(vocab)
    for token, i in tokenizer.get_vocab().items():
        if any(c in token for c in '"]}') or i in ends:
            prefer[i] = 3.0
    prompt = [ends[0]]
    generated: list[int] = []
    while len(generated) < max_tokens:
        logits = torch.randn(1, vocab, generator=generator) * 2 + prefer
        scores = processor(logits, torch.tensor([prompt + generated]), len(prompt))
        token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
        if token in ends:
            return tokenizer.decode(generated), "stop"
        generated.append(token)
        if processor.finished(generated):
            return tokenizer.decode(generated), "stop"
    return tokenizer.decode(generated), "length"


NAMES = st.sampled_from(["id", "name", "tags", "x", "y", "kind"])
LEAVES = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.just({"type": "string", "pattern": "^[a-z]{1,4}-[0-9]{2}$"}),
    st.sampled_from([{"type": "string", "format": "date"}, {"type": "string", "format": "email"},
                     {"type": "string", "format": "uuid"}]),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-50, 50),
              st.integers(0, 1000)),
    st.just({"type": "number"}), st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda v: {"enum": v}, st.lists(st.one_of(st.integers(-5, 5), st.sampled_from(["a", "b c", "ü"]),
                                                        st.none()), min_size=1, max_size=3, unique=True)),
    st.builds(lambda v: {"const": v}, st.sampled_from(["yes", 7, False, None])),
)


def composite(children: st.SearchStrategy) -> st.SearchStrategy:
    objects = st.builds(
        lambda props, data: {"type": "object", "properties": props, "additionalProperties": False,
                             "required": sorted(data.draw(st.sets(st.sampled_from(sorted(props))))) if props else []},
        st.dictionaries(NAMES, children, min_size=1, max_size=3), st.data())
    arrays = st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra},
                       children, st.integers(0, 2), st.integers(0, 2))
    any_of = st.builds(lambda a, b: {"anyOf": [a, b]}, children, children)
    one_of = st.just({"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}, {"type": "null"}]})
    return st.one_of(objects, arrays, any_of, one_of)


SCHEMAS = st.recursive(LEAVES, composite, max_leaves=6).map(
    lambda s: {"$defs": {"part": s}, "type": "object", "properties": {"a": {"$ref": "#/$defs/part"}},
               "required": ["a"]} if "anyOf" in s else s)


@pytest.mark.parametrize("name", list(VOCABULARIES))
def test_every_finished_output_validates_over_many_schemas(name):
    tokenizer, ends = VOCABULARIES[name]
    finished, total = [], [0]

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(SCHEMAS)
    def check(schema):
        processor = constraint_processor(Constraint.json_schema(schema), tokenizer, ends)
        generator = torch.Generator().manual_seed(len(json.dumps(schema)))
        for _ in range(2):
            text, reason = walk(processor, tokenizer, ends, generator)
            total[0] += 1
            if reason == "stop":  # every finished output parses and validates
                validator(schema).validate(json.loads(text))
                finished.append(text)

    check()
    assert len(finished) >= 0.6 * total[0], f"only {len(finished)} of {total[0]} walks finished"


@pytest.mark.parametrize("name", list(VOCABULARIES))
def test_regex_choices_and_grammars_hold(name):
    tokenizer, ends = VOCABULARIES[name]
    generator = torch.Generator().manual_seed(0)
    cases = [
        (Constraint.regex(r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (Constraint.choices(["yes", "no", "maybe not"]), lambda t: t in ("yes", "no", "maybe not")),
        (Constraint.grammar('start: "(" expr ")"\nexpr: NUM | expr "+" NUM\nNUM: /[0-9]/\n'),
         lambda t: re.fullmatch(r"\([0-9](\+[0-9])*\)", t)),
        (Constraint.grammar('root ::= "[" item ("," item)* "]"\nitem ::= [a-c]+\n'),  # GBNF, as llama.cpp's
         lambda t: re.fullmatch(r"\[[a-c]+(,[a-c]+)*\]", t)),
        (Constraint.any_json(), lambda t: json.loads(t) is not None or t == "null"),
    ]
    for constraint, valid in cases:
        processor = constraint_processor(constraint, tokenizer, ends)
        outcomes = [walk(processor, tokenizer, ends, generator, max_tokens=40) for _ in range(8)]
        done = [text for text, reason in outcomes if reason == "stop"]
        assert len(done) >= 4, (constraint, outcomes)
        assert all(valid(text) for text in done), (constraint, done)


def test_bad_schemas_and_patterns_fail_before_decoding_naming_the_problem():
    tokenizer, ends = VOCABULARIES["gpt2"]
    cases = [({"type": "object", "if": {"type": "object"}, "then": {}}, "unsupported keywords if, then"),
             ({"type": "array", "uniqueItems": True}, "unsupported keyword uniqueItems"),
             ({"not": {"type": "string"}}, "unsupported keyword not"),
             ({"type": "strin"}, "invalid.*'strin'"),
             ({"type": "object", "required": "name"}, "invalid.*'name' is not of type 'array'"),
             ({"$ref": "#/$defs/missing"}, "missing"),
             ({"type": "string", "pattern": "(?=a)b"}, "look-around")]
    for schema, words in cases:
        with pytest.raises(UserInputError, match=words) as error:
            constraint_processor(Constraint.json_schema(schema), tokenizer, ends)
        assert error.value.param == "json_schema" and "\n" not in str(error.value)
    with pytest.raises(UserInputError, match="not JSON"):
        constraint_processor(Constraint.json_schema("{'a': 1}"), tokenizer, ends)
    with pytest.raises(UserInputError, match="look-around") as error:
        constraint_processor(Constraint.regex(r"(?<=x)y"), tokenizer, ends)
    assert error.value.param == "regex"
    with pytest.raises(UserInputError, match="at least one choice"):
        constraint_processor(Constraint.choices([]), tokenizer, ends)
    with pytest.raises(UserInputError, match="grammar"):
        constraint_processor(Constraint.grammar("start: ( oops"), tokenizer, ends)


def test_a_character_vocabulary_that_cannot_write_json_is_a_clear_error():
    shakespeare = char_tokenizer("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(UserInputError, match=r"cannot write .*\{.*which JSON needs") as error:
        constraint_processor(Constraint.json_schema({"type": "object"}), shakespeare, [])
    assert error.value.param == "model"
    with pytest.raises(UserInputError, match="cannot write the start"):
        constraint_processor(Constraint.choices(["42"]), shakespeare, [])


# -- on the serving engine ----------------------------------------------------------------------------------------
def tiny_gpt(vocab: int) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=16, d_ff=32, max_len=256, norm="rmsnorm",
                       mlp="swiglu", positions="rope", qkv_bias=False, out_bias=False, mlp_bias=False)
    return GPT(config).eval()


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def test_a_batch_mixes_constraints_and_none_and_choices_fork():
    tokenizer, ends = VOCABULARIES["gpt2"]
    vocab = tokenizer.get_vocab_size()
    engine = Engine(tiny_gpt(vocab), tokenizer, slots=6, max_len=200, end_ids=ends)
    person = constraint_processor(Constraint.json_schema(PERSON), tokenizer, ends, vocab)
    digits = constraint_processor(Constraint.regex("[0-9]{2,3}"), tokenizer, ends, vocab)
    prompt = tokenizer.encode("hello").ids
    sampled = SamplingConfig(temperature=1.0, seed=5)
    handles = [engine.submit(Request(prompt, 60, processors=[person])),  # greedy
               engine.submit(Request(prompt, 60, sampled, n=2, processors=[person])),  # two choices, one processor
               engine.submit(Request(prompt, 10, processors=[digits])),
               engine.submit(Request(prompt, 8))]  # unconstrained beside them
    engine.run()
    people = [c for h in handles[:2] for c in h.result().choices]
    # every choice finished valid: each followed its own copy of the processor (a shared one would see the other
    # choice's tokens, break, and allow only the end token)
    assert [c.finish_reason for c in people] == ["stop"] * 3
    for choice in people:
        validator(PERSON).validate(json.loads(choice.text))
    number = handles[2].result().choices[0]
    assert number.finish_reason == "stop" and re.fullmatch("[0-9]{2,3}", number.text)
    free = handles[3].result().choices[0]
    alone = Engine(tiny_gpt(vocab), tokenizer, slots=1, max_len=200, end_ids=ends)
    reference = alone.submit(Request(prompt, 8))
    alone.run()
    assert free.tokens == reference.result().choices[0].tokens  # a constraint beside it changes nothing
    # the processor handed in stays at its start: the same object serves a later request
    again = engine.submit(Request(prompt, 60, processors=[person]))
    engine.run()
    assert again.result().choices[0].tokens == handles[0].result().choices[0].tokens


def test_truncation_says_length_and_a_model_without_end_tokens_still_stops():
    tokenizer, ends = VOCABULARIES["torchbook"]
    vocab = tokenizer.get_vocab_size()
    prompt = tokenizer.encode("hello").ids
    engine = Engine(tiny_gpt(vocab), tokenizer, slots=2, max_len=200, end_ids=ends)
    long = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"},
                                                       "minItems": 30}}, "required": ["items"]}
    cut = constraint_processor(Constraint.json_schema(long), tokenizer, ends, vocab)
    handle = engine.submit(Request(prompt, 12, processors=[cut]))
    engine.run()
    choice = handle.result().choices[0]
    assert choice.finish_reason == "length" and len(choice.tokens) == 12
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.text)
    assert not cut.fork().complete(choice.tokens)
    # no end tokens at all (a run folder's model): the constraint itself ends the choice once nothing can follow
    engine = Engine(tiny_gpt(vocab), tokenizer, slots=1, max_len=200, end_ids=[])
    choices = constraint_processor(Constraint.choices(["red", "green", "blue"]), tokenizer, [], vocab)
    handle = engine.submit(Request(prompt, 20, processors=[choices]))
    engine.run()
    choice = handle.result().choices[0]
    assert choice.finish_reason == "stop" and choice.text in ("red", "green", "blue")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("style", ["hermes", "llama3", "mistral"])
def test_required_tool_calls_parse_and_validate_under_their_tools_schemas(style):
    tokenizer, ends = VOCABULARIES["gpt2"]
    generator = torch.Generator().manual_seed(1)
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    for name in (None, "get_time"):
        processor = constraint_processor(Constraint.tool_calls([WEATHER, TIME], style, name), tokenizer, ends)
        done = 0
        for _ in range(8):
            text, reason = walk(processor, tokenizer, ends, generator, max_tokens=100)
            if reason != "stop":
                continue
            done += 1
            content, calls = parse_tool_calls(text, style, tools=[WEATHER, TIME])
            assert content == "" and calls, text
            for call in calls:
                assert name in (None, call.name)
                validator(schemas[call.name]).validate(call.arguments)
        assert done >= 5
    with pytest.raises(UserInputError, match="not among the declared tools"):
        Constraint.tool_calls([WEATHER], style, "get_time")
    with pytest.raises(UserInputError, match="unsupported keyword uniqueItems") as error:
        constraint_processor(Constraint.tool_calls([{"function": {"name": "f", "parameters": {
            "type": "array", "uniqueItems": True}}}], style), tokenizer, ends)
    assert error.value.param == "tools"


# -- SmolLM2 --------------------------------------------------------------------------------------------------
SMOL_CASES = [
    ("Give a person's name and age as JSON.", PERSON),
    ("Is the sky blue? Answer as JSON with a boolean.",
     {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
    ("List three colours as JSON.", {"type": "object", "properties": {"colours": {
        "type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 3, "maxItems": 3}},
        "required": ["colours"]}),
    ("What is the capital of France? Reply as JSON.", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "country": {"enum": ["France", "Germany", "Spain"]}},
        "required": ["city", "country"], "additionalProperties": False}),
]
SMOL_SLOW_CASES = SMOL_CASES + [
    ("Describe a book as JSON.", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40}, "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
        "genres": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
        "required": ["title", "year", "genres"]}),
    ("A point on a map, as JSON.", {"type": "object", "properties": {
        "lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180,
                                                                           "maximum": 180}},
        "required": ["lat", "lon"], "additionalProperties": False}),
    ("Pick a shape.", {"$defs": {"circle": {"type": "object", "properties": {"radius": {"type": "number"}},
                                            "required": ["radius"], "additionalProperties": False},
                                 "square": {"type": "object", "properties": {"side": {"type": "number"}},
                                            "required": ["side"], "additionalProperties": False}},
                       "anyOf": [{"$ref": "#/$defs/circle"}, {"$ref": "#/$defs/square"}]}),
    ("Today's date, as JSON.", {"type": "object", "properties": {"date": {"type": "string", "format": "date"}},
                                "required": ["date"]}),
    ("Any JSON about cats.", {}),
    ("An order as JSON.", {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1},
        "express": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 30}},
        "required": ["id", "qty", "express", "note"]}),
]


@pytest.fixture(scope="module")
def smollm2():
    import torchbook
    from torchbook.hub.gguf import default_chat_model

    return torchbook.load(default_chat_model())


def smollm2_outputs(loaded, cases, max_tokens: int) -> list[tuple[dict, str, str]]:
    from torchbook.generate.text import generate_text
    from torchbook.hub.prompts import chat_prompt, messages_for

    ends = loaded.meta["end_token_ids"]
    results = []
    for i, (question, schema) in enumerate(cases):
        processor = constraint_processor(Constraint.json_schema(schema), loaded.tokenizer, ends,
                                         loaded.model.config.vocab_size)
        prompt = chat_prompt(messages_for(question), loaded.meta)
        sampling = SamplingConfig(temperature=0.0) if i % 2 == 0 else SamplingConfig(temperature=0.7, seed=i)
        completion = generate_text(loaded.model, loaded.tokenizer, prompt, max_tokens, sampling, end_ids=ends,
                                   add_special_tokens=False, processors=[processor])[0]
        results.append((schema, completion.text, completion.finish_reason))
    return results


def check_smollm2(results: list[tuple[dict, str, str]]) -> None:
    finished = [(schema, text) for schema, text, reason in results if reason == "stop"]
    assert len(finished) >= 0.9 * len(results), results
    for schema, text in finished:
        validator(schema).validate(json.loads(text))


def test_smollm2_finishes_valid_json(smollm2):
    check_smollm2(smollm2_outputs(smollm2, SMOL_CASES[:3], max_tokens=48))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_finishes_valid_json_on_more_schemas(smollm2):
    check_smollm2(smollm2_outputs(smollm2, SMOL_SLOW_CASES, max_tokens=96))
