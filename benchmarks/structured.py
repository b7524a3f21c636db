"""Structured output (chapter 15): constrained decoding's cost and the mask libraries compared, on SmolLM2-135M-Instruct.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/structured.py [--repeats 3] [--walks 3]

Measures, in one run (ratios from the same run; the machine may be shared):
1. per-token overhead at batch 1: SmolLM2 (the GGUF file, float32, 1 thread) answers the fixed prompts of
   `CASES` on the serving engine unconstrained and constrained by their schemas (greedy); the time inside the
   constraint processor per generated token (mask computation and applying it), against the unconstrained
   decoding time per token (the goal: under 10%), and both end-to-end times per token;
2. compile time: the vocabulary's one-off preparation, and each schema's compilation, per library;
3. mask time per token: each library follows SmolLM2's constrained outputs token by token, computing the full
   49,152-token mask at each step (llguidance, xgrammar, outlines-core);
4. schema coverage: `COVERAGE`'s schemas, one JSON Schema feature each; a library covers a schema when it compiles
   it and every random walk through its masks that finishes (random logits pushed towards closing characters,
   `--walks` walks of at most 64 tokens) validates with `jsonschema`. A library that compiles a schema but
   ignores a keyword (its outputs break it) does not cover it; one that rejects it says so before decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import torch

CASES = [
    ("Give a person's name and age as JSON.", {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("List three colours as JSON.", {"type": "object", "properties": {"colours": {
        "type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 3, "maxItems": 3}},
        "required": ["colours"], "additionalProperties": False}),
    ("Describe a book as JSON.", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40}, "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
        "genres": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
        "required": ["title", "year", "genres"], "additionalProperties": False}),
    ("What is the capital of France? Reply as JSON.", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "country": {"enum": ["France", "Germany", "Spain"]}},
        "required": ["city", "country"], "additionalProperties": False}),
]

COVERAGE: dict[str, dict[str, Any]] = {
    "nested objects, required": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "integer"}}, "required": ["b"], "additionalProperties": False}}, "required": ["a"],
        "additionalProperties": False},
    "arrays minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
    "enum": {"enum": ["red", 3, None]},
    "const": {"const": {"k": [1, 2]}},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "null"}, "maxItems": 2}]},
    "oneOf (disjoint)": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "$ref/$defs": {"$defs": {"p": {"type": "integer", "minimum": 5}}, "type": "object",
                   "properties": {"x": {"$ref": "#/$defs/p"}}, "required": ["x"], "additionalProperties": False},
    "recursive $ref": {"$defs": {"node": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["kids"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "string min/maxLength": {"type": "string", "minLength": 2, "maxLength": 4},
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    "format date": {"type": "string", "format": "date"},
    "format email": {"type": "string", "format": "email"},
    "format uuid": {"type": "string", "format": "uuid"},
    "integer minimum/maximum": {"type": "integer", "minimum": -3, "maximum": 250},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
    "multipleOf": {"type": "integer", "multipleOf": 7},
    "type list with null": {"type": ["string", "null"], "maxLength": 3},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                          "additionalProperties": False},
    "minProperties": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "minProperties": 1, "additionalProperties": False},
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "minItems": 2},
    "not": {"not": {"type": "string"}},
    "if/then": {"type": "object", "properties": {"a": {"type": "integer"}}, "if": {"required": ["a"]},
                "then": {"required": ["b"]}},
}


# -- the three libraries behind one small interface ------------------------------------------------------------
class Library:
    """compile(schema) -> a state factory; each state: compute() the mask in the library's own format,
    allowed(native) as bool (V,), advance(token), done() (accepting and nothing can follow)."""

    name = ""

    def prepare(self, tokenizer: Any, vocab: int, ends: list[int]) -> None: ...

    def compile(self, schema: dict, replay: bool = False) -> Callable[[], Any]: ...


class LLGuidance(Library):
    name = "llguidance"

    def prepare(self, tokenizer: Any, vocab: int, ends: list[int]) -> None:
        from llguidance import LLTokenizer

        self.tokenizer = LLTokenizer(tokenizer.to_str(), n_vocab=vocab, eos_token=ends)  # uncached, to time it

    def compile(self, schema: dict, replay: bool = False) -> Callable[[], Any]:
        from llguidance import LLMatcher

        from torchbook.generate.constraints import Constraint, grammar_text

        text = grammar_text(Constraint.json_schema(schema))
        error, messages = LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        if error:
            raise ValueError(messages[0])
        matcher = LLMatcher(self.tokenizer, text, log_level=0)
        return lambda: _LLState(matcher.deep_copy())


class LLGuidanceBits(LLGuidance):
    """llguidance's bitmask API (one bit per token, as xgrammar's), the fastest form it computes."""

    name = "llguidance (bitmask)"

    def compile(self, schema: dict, replay: bool = False) -> Callable[[], Any]:
        factory = super().compile(schema, replay)
        return lambda: _LLBitState(factory().matcher, self.tokenizer.vocab_size)


class _LLState:
    def __init__(self, matcher: Any):
        self.matcher = matcher

    def compute(self) -> Any:
        return self.matcher.compute_logit_bias()  # one byte per token

    def allowed(self, native: Any = None) -> torch.Tensor:
        native = self.compute() if native is None else native
        return torch.frombuffer(bytearray(native), dtype=torch.uint8).bool()

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    def done(self) -> bool:
        return bool(self.matcher.is_stopped())


class _LLBitState(_LLState):
    def __init__(self, matcher: Any, vocab: int):
        super().__init__(matcher)
        self.vocab = vocab
        self.bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
        self.bits = torch.arange(32, dtype=torch.int32)

    def compute(self) -> Any:
        v = self.bitmask[0]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())  # llguidance.torch's way
        return self.bitmask

    def allowed(self, native: Any = None) -> torch.Tensor:
        native = self.compute() if native is None else native
        return ((native[0, :, None] >> self.bits) & 1).bool().flatten()[: self.vocab]


class XGrammar(Library):
    name = "xgrammar"

    def prepare(self, tokenizer: Any, vocab: int, ends: list[int]) -> None:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=ends)
        self.vocab = vocab

    def compile(self, schema: dict, replay: bool = False) -> Callable[[], Any]:
        import xgrammar as xgr

        # replaying llguidance's outputs needs its spaces (" ," after a string); walks get compact JSON, as random
        # logits loop in free whitespace
        compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=replay)
        return lambda: _XGState(xgr.GrammarMatcher(compiled), self.vocab)


class _XGState:
    def __init__(self, matcher: Any, vocab: int):
        import xgrammar as xgr

        self.matcher, self.vocab = matcher, vocab
        self.bitmask = xgr.allocate_token_bitmask(1, vocab)
        self.bits = torch.arange(32, dtype=torch.int32)

    def compute(self) -> Any:
        self.matcher.fill_next_token_bitmask(self.bitmask)  # one bit per token
        return self.bitmask

    def allowed(self, native: Any = None) -> torch.Tensor:
        native = self.compute() if native is None else native
        return ((native[0, :, None] >> self.bits) & 1).bool().flatten()[: self.vocab]

    def advance(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def done(self) -> bool:
        return bool(self.matcher.is_terminated())


class OutlinesCore(Library):
    name = "outlines-core"

    def prepare(self, tokenizer: Any, vocab: int, ends: list[int]) -> None:
        from outlines_core import Vocabulary

        decode = byte_decoder()
        tokens: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i in ends or (token.startswith("<|") and token.endswith("|>")):
                continue
            if all(c in decode for c in token):
                tokens.setdefault(bytes(decode[c] for c in token), []).append(i)
        self.vocabulary = Vocabulary(ends[0], tokens)
        self.vocab, self.ends = vocab, ends

    def compile(self, schema: dict, replay: bool = False) -> Callable[[], Any]:
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        index = Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)
        return lambda: _OCState(Guide(index), self.vocab)


class _OCState:
    def __init__(self, guide: Any, vocab: int):
        self.guide, self.vocab = guide, vocab

    def compute(self) -> Any:
        return self.guide.get_tokens()  # the allowed ids

    def allowed(self, native: Any = None) -> torch.Tensor:
        native = self.compute() if native is None else native
        allowed = torch.zeros(self.vocab, dtype=torch.bool)
        allowed[native] = True
        return allowed

    def advance(self, token: int) -> bool:
        try:
            self.guide.advance(token)
            return True
        except Exception:  # a token the index does not allow
            return False

    def done(self) -> bool:
        return bool(self.guide.is_finished())


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as, reversed."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def library_objects() -> list[Library]:
    found: list[Library] = [LLGuidance()]
    for cls, module in ((XGrammar, "xgrammar"), (OutlinesCore, "outlines_core")):
        try:
            __import__(module)
            found.append(cls())
        except ImportError:
            print(f"{module} is not installed: left out (make install installs it)")
    return found


# -- measurements ----------------------------------------------------------------------------------------------
def decode_overhead(loaded: Any, repeats: int) -> tuple[dict[str, float], list[list[int]]]:
    """Per-token times at batch 1, unconstrained and constrained (greedy), and the constrained outputs' tokens."""
    from torchbook.generate.constraints import Constraint, constraint_processor
    from torchbook.generate.sampling import SamplingConfig
    from torchbook.generate.serving import Engine, Request
    from torchbook.hub.prompts import chat_token_ids, messages_for

    tokenizer, meta, model = loaded.tokenizer, loaded.meta, loaded.model
    ends = meta["end_token_ids"]
    vocab = model.config.vocab_size
    engine = Engine(model, tokenizer, slots=1, max_len=512, end_ids=ends, prefix_cache=False)
    inside, free_s, free_n, bound_s, bound_n = [0.0], 0.0, 0, 0.0, 0
    outputs: list[list[int]] = []
    for question, schema in CASES:
        prompt = chat_token_ids(tokenizer, messages_for(question), meta)
        processor = constraint_processor(Constraint.json_schema(schema), tokenizer, ends, vocab)
        timed = Timed(processor, inside)
        for repeat in range(repeats):
            for constrained in (False, True):
                # the unconstrained answer runs exactly as many tokens as the constrained one (no end token),
                # so the two are timed over the same lengths
                n = len(outputs[-1]) if outputs and not constrained and repeat > 0 else 64
                request = Request(prompt, n, SamplingConfig(temperature=0.0), end_ids=ends if constrained else [],
                                  processors=[timed] if constrained else [])
                start = time.perf_counter()
                handle = engine.submit(request)
                engine.run()
                result = handle.result()
                elapsed = time.perf_counter() - start - result.first_token_s  # decoding steps only
                tokens = len(result.choices[0].tokens)
                if constrained:
                    bound_s, bound_n = bound_s + elapsed, bound_n + tokens - 1
                    if repeat == 0:
                        outputs.append(result.choices[0].tokens)
                        valid = result.choices[0].finish_reason == "stop"
                        print(f"  {question!r}: {result.choices[0].text!r} ({'valid' if valid else 'cut'})")
                elif repeat > 0:
                    free_s, free_n = free_s + elapsed, free_n + tokens - 1
    generated = sum(len(o) for o in outputs) * repeats
    return {"free_ms": 1000 * free_s / max(free_n, 1), "bound_ms": 1000 * bound_s / max(bound_n, 1),
            "processor_ms": 1000 * inside[0] / max(generated, 1)}, outputs


class Timed:
    """A processor wrapped to add the seconds spent in it (mask, applying it, following the tokens) to `total`."""

    def __init__(self, processor: Any, total: list[float]):
        self.processor, self.total = processor, total

    def fork(self) -> Timed:
        return Timed(self.processor.fork(), self.total)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
        start = time.perf_counter()
        out = self.processor(logits, tokens, prompt_len)
        self.total[0] += time.perf_counter() - start
        return out

    def finished(self, generated: list[int]) -> bool:
        start = time.perf_counter()
        done = self.processor.finished(generated)
        self.total[0] += time.perf_counter() - start
        return bool(done)


def compile_and_mask_times(libraries: list[Library], tokenizer: Any, vocab: int, ends: list[int],
                           outputs: list[list[int]]) -> dict[str, dict[str, float]]:
    rows = {}
    for library in libraries:
        start = time.perf_counter()
        library.prepare(tokenizer, vocab, ends)
        prepare = time.perf_counter() - start
        compiles, masks = [], []
        for (_, schema), tokens in zip(CASES, outputs):
            start = time.perf_counter()
            factory = library.compile(schema, replay=True)
            state = factory()
            compiles.append(time.perf_counter() - start)
            for token in tokens:
                if token in ends:
                    break
                start = time.perf_counter()
                native = state.compute()  # the library's own mask format: the conversion is not timed
                masks.append(time.perf_counter() - start)
                allowed = state.allowed(native)
                if not allowed[token]:  # its JSON whitespace rules differ: the rest of this output is not followed
                    break
                state.advance(token)
        rows[library.name] = {"prepare_s": prepare, "compile_ms": 1000 * statistics.mean(compiles),
                              "mask_ms": 1000 * statistics.mean(masks), "mask_p99_ms": 1000 * percentile(masks, 0.99),
                              "mask_median_ms": 1000 * statistics.median(masks),
                              "steps": len(masks)}
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def coverage(libraries: list[Library], tokenizer: Any, ends: list[int], walks: int) -> dict[str, dict[str, str]]:
    """Per library and schema: "ok", "rejected" (an error before decoding) or "invalid" (an output broke it)."""
    vocab = tokenizer.get_vocab_size()
    prefer = torch.zeros(vocab)
    for token, i in tokenizer.get_vocab().items():
        if any(c in token for c in '"]}') or i in ends:
            prefer[i] = 4.0
    table: dict[str, dict[str, str]] = {lib.name: {} for lib in libraries}
    for name, schema in COVERAGE.items():
        check = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        for library in libraries:
            try:
                factory = library.compile(schema)
            except Exception:  # each library has its own exceptions for a schema it does not take
                table[library.name][name] = "rejected"
                continue
            generator = torch.Generator().manual_seed(0)
            verdict, finished = "ok", 0
            for _ in range(walks):
                state, tokens = factory(), []
                for _ in range(64):
                    allowed = state.allowed()
                    scores = (torch.randn(vocab, generator=generator) * 2 + prefer).masked_fill(~allowed[:vocab],
                                                                                               float("-inf"))
                    token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
                    if token in ends or not state.advance(token):
                        break
                    tokens.append(token)
                    if state.done():
                        break
                text = tokenizer.decode(tokens)
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    continue  # cut by the 64 tokens: not finished
                finished += 1
                if not check.is_valid(value):
                    verdict = "invalid"
                    print(f"  {library.name} / {name}: {text!r} breaks the schema")
            table[library.name][name] = verdict if finished else "unfinished"
    return table


def print_times(times: dict[str, float]) -> None:
    print(f"decoding: unconstrained {times['free_ms']:.1f} ms/token, constrained {times['bound_ms']:.1f} ms/token "
          f"(end to end: {100 * (times['bound_ms'] / times['free_ms'] - 1):+.1f}%); inside the constraint processor "
          f"{times['processor_ms']:.2f} ms/token = {100 * times['processor_ms'] / times['free_ms']:.1f}% of an "
          "unconstrained token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each prompt (default 3)")
    parser.add_argument("--walks", type=int, default=3, help="random walks per library and coverage schema")
    parser.add_argument("--skip-coverage", action="store_true", help="leave out part 4")
    parser.add_argument("--skip-decoding", action="store_true", help="leave out part 1 (replay outputs saved by a "
                        "previous run in --outputs)")
    parser.add_argument("--outputs", default="/tmp/torchbook-structured-outputs.json",
                        help="where part 1's constrained outputs are saved for --skip-decoding")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import torchbook
    from torchbook.hub.gguf import default_chat_model

    loaded = torchbook.load(default_chat_model())
    ends = loaded.meta["end_token_ids"]
    vocab = loaded.model.config.vocab_size
    print(f"SmolLM2-135M-Instruct (float32, 1 thread), vocabulary {vocab}, batch 1, greedy")
    if args.skip_decoding:
        outputs = json.loads(Path(args.outputs).read_text())
    else:
        times, outputs = decode_overhead(loaded, args.repeats)
        Path(args.outputs).write_text(json.dumps(outputs))
        print_times(times)
    libraries = library_objects()
    rows = compile_and_mask_times([*libraries[:1], LLGuidanceBits(), *libraries[1:]], loaded.tokenizer, vocab, ends,
                                  outputs)
    print("\n| library | vocabulary preparation (s) | schema compile (ms, mean) | mask per token (ms): mean | median "
          "| p99 | steps |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['prepare_s']:.2f} | {row['compile_ms']:.1f} | {row['mask_ms']:.3f} | "
              f"{row['mask_median_ms']:.3f} | {row['mask_p99_ms']:.3f} | {row['steps']} |")
    if args.skip_coverage:
        return
    table = coverage(libraries, loaded.tokenizer, ends, args.walks)
    print("\n| schema feature | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for name in COVERAGE:
        print(f"| {name} | " + " | ".join(table[lib][name] for lib in table) + " |")
    for lib, verdicts in table.items():
        print(f"{lib}: covers {sum(v == 'ok' for v in verdicts.values())} of {len(COVERAGE)} "
              f"(rejected {sum(v == 'rejected' for v in verdicts.values())}, "
              f"invalid output {sum(v == 'invalid' for v in verdicts.values())})")


if __name__ == "__main__":
    main()
