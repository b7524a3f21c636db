"""What the two translators share (chapters 14 and 15): data preparation, training with the translation step,
`translate()` with greedy or beam search, BLEU/chrF evaluation and the report's common part. The recipes
`translator` (the Transformer) and `translator-rnn` (the encoder-decoder RNN) build their model and call these, so
that the two compare on equal terms."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import torchbook
from torchbook.data.tokenizers import save_tokenizer, special_ids, train_bpe
from torchbook.data.translation import (
    PairDataset,
    TranslationData,
    bucket_batches,
    eval_batches,
    load_pairs,
    pad_collate,
)
from torchbook.errors import CheckpointError, UserInputError, unknown
from torchbook.generate import beam_search, decode
from torchbook.hub import save_model
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train.config import TrainConfig
from torchbook.train.steps import translation_step
from torchbook.train.trainer import Trainer

log = logging.getLogger(__name__)

BOOK_EXAMPLES = ["I like soccer", "I like to play soccer with my friends at the beach"]


@dataclass
class TranslationConfig(TrainConfig):
    """What both translators share: data, tokenizer, batching, decoding and evaluation settings."""

    data: str = "gettext"  # gettext (offline, this machine's catalogs) or tatoeba (the book's, downloaded)
    vocab_size: int = 10_000  # shared English-Spanish BPE vocabulary
    max_tokens: int = 64  # longest source/target sentence in tokens (longer ones are cut in training)
    batch_size: int = 64  # most sentences per batch...
    batch_tokens: int = 2048  # ...and most padded tokens per batch (length bucketing keeps padding low)
    label_smoothing: float = 0.0
    limit: int = 0  # train on only this many pairs (0: all), for smoke runs
    beam_width: int = 3  # the book's beam width
    length_penalty: float = 1.0  # beam search ranks by log-prob / length ** length_penalty
    eval_sentences: int = 0  # translate only this many test sentences for BLEU/chrF (0: all)

    def validate(self) -> None:
        super().validate()
        if self.data not in ("gettext", "tatoeba"):
            raise unknown("translation data", self.data, ["gettext", "tatoeba"])
        if self.max_tokens < 4 or self.batch_tokens < self.max_tokens:
            raise UserInputError(f"max_tokens={self.max_tokens} must be >= 4 and <= batch_tokens={self.batch_tokens}")
        if self.beam_width < 1:
            raise UserInputError(f"beam_width={self.beam_width} must be at least 1")


# -- data ----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    data: TranslationData
    tokenizer: Any
    ids: dict[str, int]
    train: PairDataset
    val: PairDataset


def prepare(config: TranslationConfig) -> Prepared:
    """Load the pairs, train the BPE tokenizer on the training pairs (both languages), make token datasets."""
    data = load_pairs(config.data, config.seed)
    if config.limit:  # smoke runs: a sliver of training pairs, and of validation pairs in proportion
        data.train = data.train[: config.limit]
        data.val = data.val[: max(50, config.limit // 10)]
    tokenizer = train_bpe([text for pair in data.train for text in pair], config.vocab_size)
    ids = special_ids(tokenizer)
    train = PairDataset(data.train, tokenizer, ids["bos"], ids["eos"], config.max_tokens, drop_long=True)
    val = PairDataset(data.val, tokenizer, ids["bos"], ids["eos"], config.max_tokens)
    return Prepared(data, tokenizer, ids, train, val)


def train_translator(model: nn.Module, config: TranslationConfig, run: RunDir, prep: Prepared) -> Trainer:
    """Train with the shared trainer on length-bucketed, padding-aware batches."""
    lengths = prep.train.lengths()
    trainer = Trainer(
        model, config, run, prep.train, prep.val if len(prep.val) else None,
        step=translation_step(prep.ids["pad"], config.label_smoothing),
        collate_fn=pad_collate(prep.ids["pad"]),
        batches=lambda epoch: bucket_batches(lengths, config.batch_tokens, config.batch_size, config.seed, epoch),
    )
    trainer.fit()
    return trainer


# -- translating ---------------------------------------------------------------------------------------------
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def source_pieces(text: str, tokenizer: Any, max_source: int) -> list[list[int]]:
    """Token ids of `text`, split into sentences when too long for the model; a sentence still too long is
    truncated with a warning."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) <= max_source:
        return [ids]
    pieces = []
    for sentence in SENTENCE_END.split(text.strip()):
        sentence_ids = tokenizer.encode(sentence, add_special_tokens=False).ids
        if len(sentence_ids) > max_source:
            log.warning("a sentence of %d tokens is longer than the model's maximum of %d: truncated",
                        len(sentence_ids), max_source)
            sentence_ids = sentence_ids[:max_source]
        if sentence_ids:
            pieces.append(sentence_ids)
    return pieces


@torch.no_grad()
def decode_sources(
    model: Any, sources: Sequence[list[int]], beam: int = 1, length_penalty: float = 1.0, max_new_tokens: int = 64,
    batch_size: int = 64,
) -> tuple[list[list[int]], list[float]]:
    """Translate token-id sources (each without </s>) in length-sorted batches: greedy (beam=1) or beam search.
    Returns the output ids of each source (in the input order) and their log-probabilities under the model."""
    c = model.config
    model.eval()
    device = next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in sources]
    log_probs = [0.0] * len(sources)
    lengths = [len(s) + 1 for s in sources]
    for batch in eval_batches(lengths, batch_size * max(lengths, default=1), batch_size):
        rows = [torch.tensor(list(sources[i]) + [c.eos_id], device=device) for i in batch]
        source = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=c.pad_id)
        state = model.start_decoding(len(batch), source=source)
        first = torch.full((len(batch), 1), c.bos_id, dtype=torch.long, device=device)
        if beam > 1:
            out = beam_search(model, state, first, beam, length_penalty, max_new_tokens, c.eos_id)
        else:
            out = decode(model, state, first, max_new_tokens, c.eos_id)
        for i, tokens, lp in zip(batch, out.token_lists(), out.log_prob.tolist()):
            outputs[i], log_probs[i] = tokens, lp
    return outputs, log_probs


def translate(
    model: Any, tokenizer: Any, texts: Sequence[str], beam: int = 1, length_penalty: float = 1.0,
    max_new_tokens: int | None = None,
) -> list[str]:
    """English sentences -> Spanish. Empty input gives empty output; long input is split into sentences."""
    max_source = model.config.max_len - 2
    limit = max_new_tokens or max_source
    pieces_of = [source_pieces(text, tokenizer, max_source) if text.strip() else [] for text in texts]
    flat = [piece for pieces in pieces_of for piece in pieces]
    outputs, _ = decode_sources(model, flat, beam, length_penalty, limit)
    decoded = tokenizer.decode_batch(outputs, skip_special_tokens=True) if outputs else []
    result, at = [], 0
    for pieces in pieces_of:
        result.append(" ".join(decoded[at : at + len(pieces)]).strip())
        at += len(pieces)
    return result


def translate_run(run_dir: str, texts: Sequence[str], beam: int = 1, length_penalty: float = 1.0,
                  device: str = "cpu") -> list[str]:
    """Load a translator run folder (either recipe) onto `device` and translate `texts`."""
    RunDir.open(run_dir).require(("translator", "translator-rnn"), "translating")
    loaded = torchbook.load(run_dir, map_location=device)
    if loaded.tokenizer is None or not hasattr(loaded.model, "start_decoding"):
        raise CheckpointError(f"{run_dir!r} is not a translator run (no tokenizer.json or no decoding model)")
    return translate(loaded.model, loaded.tokenizer, texts, beam, length_penalty)


# -- evaluation ----------------------------------------------------------------------------------------------
def evaluate_translations(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], beam_width: int, length_penalty: float
) -> dict[str, Any]:
    """BLEU and chrF (sacrebleu) of greedy and beam search on `pairs`, and how often beam search with length
    penalty 0 finds a translation at least as probable as greedy's."""
    import sacrebleu

    max_source = model.config.max_len - 2
    sources = [tokenizer.encode(en, add_special_tokens=False).ids[:max_source] for en, _ in pairs]
    references = [[es for _, es in pairs]]
    results: dict[str, Any] = {"test_sentences": len(pairs)}
    # The baseline to beat: copying the English input (technical terms, names and numbers often stay the same).
    results["copy_source_chrf"] = sacrebleu.corpus_chrf([en for en, _ in pairs], references).score
    timings = {}
    log_probs = {}
    for name, beam, lp in (("greedy", 1, 1.0), ("beam", beam_width, length_penalty)):
        start = time.perf_counter()
        outputs, log_probs[name] = decode_sources(model, sources, beam, lp, max_source)
        timings[name] = time.perf_counter() - start
        hypotheses = tokenizer.decode_batch(outputs, skip_special_tokens=True)
        results[f"{name}_bleu"] = sacrebleu.corpus_bleu(hypotheses, references).score
        results[f"{name}_chrf"] = sacrebleu.corpus_chrf(hypotheses, references).score
        results[f"{name}_sentences_per_s"] = len(pairs) / max(timings[name], 1e-9)
        results[f"{name}_examples"] = list(zip([en for en, _ in pairs[:8]], hypotheses[:8], references[0][:8]))
    beam_lp = log_probs["beam"] if length_penalty == 0 else decode_sources(model, sources, beam_width, 0.0, max_source)[1]
    at_least = [b >= g - 1e-4 for b, g in zip(beam_lp, log_probs["greedy"])]
    results["beam_logprob_at_least_greedy"] = sum(at_least) / max(1, len(at_least))
    return results


def unigram_loss(train: PairDataset, val: PairDataset, vocab_size: int) -> float:
    """Cross-entropy (nats per token) on the validation targets of a source-blind model that predicts every target
    token from its training frequency (add-one smoothed): the baseline a translator must beat by reading the source."""
    counts = torch.ones(vocab_size)
    for target in train.targets:
        counts += torch.bincount(target[1:], minlength=vocab_size).float()
    log_p = (counts / counts.sum()).log()
    tokens = torch.cat([t[1:] for t in val.targets]) if len(val) else torch.zeros(0, dtype=torch.long)
    return float(-log_p[tokens].mean()) if len(tokens) else float("nan")


def test_pairs(data: TranslationData, n: int) -> list[tuple[str, str]]:
    """The first `n` test pairs after a fixed shuffle (all when n is 0)."""
    pairs = list(data.test)
    random.Random(0).shuffle(pairs)
    return pairs[:n] if n else pairs


def finish_run(
    run: RunDir, config: TranslationConfig, prep: Prepared, model: nn.Module, trainer: Trainer, report: Report,
    started: float,
) -> dict[str, Any]:
    """Save model and tokenizer, evaluate on the held-out pairs, write results, manifest and report."""
    save_model(model, run.model_dir, extra={"data": config.data})
    save_tokenizer(prep.tokenizer, run.model_dir)
    run.write_json("manifest.json", {"source": prep.data.source, "catalogs": prep.data.manifest,
                                     "pairs": {"train": len(prep.data.train), "val": len(prep.data.val),
                                               "test": len(prep.data.test)}})
    model.eval()
    results = evaluate_translations(model, prep.tokenizer, test_pairs(prep.data, config.eval_sentences),
                                    config.beam_width, config.length_penalty)
    results["book_examples"] = list(zip(BOOK_EXAMPLES, translate(model, prep.tokenizer, BOOK_EXAMPLES, 1),
                                        translate(model, prep.tokenizer, BOOK_EXAMPLES, config.beam_width)))
    if len(prep.val):
        results["val_loss"] = trainer.evaluate(prep.val)["loss"]
        results["unigram_val_loss"] = unigram_loss(prep.train, prep.val, prep.tokenizer.get_vocab_size())
    results["train_time_s"] = trainer.train_time
    results["epochs_run"] = trainer.epoch
    results["parameters"] = sum(p.numel() for p in model.parameters())
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if isinstance(v, (int, float))})
    where = "held-out catalogs" if config.data == "gettext" else "held-out pairs"
    for name in ("greedy", "beam"):
        label = "greedy" if name == "greedy" else f"beam search (width {config.beam_width})"
        report.compare(f"test BLEU, {label}", results[f"{name}_bleu"], None, f"sacrebleu, {where}; the book gives none")
        report.compare(f"test chrF, {label}", results[f"{name}_chrf"], None, f"sacrebleu, {where}")
    report.compare("test chrF, copying the English input", results["copy_source_chrf"], None, "the baseline to beat")
    if "val_loss" in results:
        report.compare("validation loss (nats/token)", results["val_loss"], None,
                       f"source-blind unigram baseline: {results['unigram_val_loss']:.3f}")
    report.compare("beam log-prob >= greedy's (length penalty 0)", results["beam_logprob_at_least_greedy"], None,
                   "share of test sentences")
    report.compare("training time (s)", trainer.train_time, None, f"{trainer.global_step} optimizer steps")
    report.table("The book's examples", ["English", "greedy", f"beam {config.beam_width}"], results["book_examples"])
    report.table("Sample test translations (beam)", ["English", "ours", "reference"], results["beam_examples"])
    if (run.plots / "learning_curves.png").exists():
        report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    steps = run.metrics("step")
    if steps:  # time-boxed runs may end inside the first epoch: the per-step training loss always exists
        from torchbook.plots import line_plot

        line_plot(run.plots / "training_loss.png", {"training loss": ([r["step"] for r in steps],
                  [r["loss"] for r in steps])}, "Training loss (label-smoothed)", "optimizer step", "nats/token")
        report.image("Training loss by step", run.plots / "training_loss.png", run.path)
    report.table("Data manifest (catalog, sha256, pairs, split)", ["file", "sha256", "pairs", "split"],
                 [[m["file"], m["sha256"][:12], m["pairs"], m["split"]] for m in prep.data.manifest])
    report.text("Data", f"{len(prep.data.train):,} training, {len(prep.data.val):,} validation and "
                        f"{len(prep.data.test):,} test pairs; shared BPE vocabulary of "
                        f"{prep.tokenizer.get_vocab_size():,} tokens with byte fallback.")
    report.write(run.path, time.time() - started)
    return results


def evaluate_run(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    """Reload a finished translator run (either recipe) and measure BLEU/chrF again on its test split (rebuilt
    from the run's data settings; for gettext, the catalogs now installed: compare with manifest.json)."""
    run = RunDir.open(run_dir)
    values = run.config_values()
    loaded = torchbook.load(run.path, map_location=device)
    data = load_pairs(values["data"], values["seed"])
    pairs = test_pairs(data, values["eval_sentences"])
    results = evaluate_translations(loaded.model, loaded.tokenizer, pairs, values["beam_width"],
                                    values["length_penalty"])
    return {k: v for k, v in results.items() if not k.endswith("_examples")}
