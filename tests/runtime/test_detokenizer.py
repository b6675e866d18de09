"""IncrementalDetokenizer tests against tiny tokenizers trained here with the
`tokenizers` library: byte-level BPE (tokens split multibyte UTF-8 characters)
and a SentencePiece-style Metaspace BPE (decoders that drop a leading space)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetserve.runtime.detokenizer import IncrementalDetokenizer
from fleetserve.runtime.sampling_params import SamplingParams

SP = SamplingParams
CORPUS = [
    "The café served crème brûlée and a naïve entrée.",
    "中文文本: 我们喜欢中文和日本語の文字。",
    "Emoji time 😀🎉🚀 and more 😀 smiles 👍🏽 here.",
    "Hello world, hello tokenizer; the quick brown fox jumps over the lazy dog.",
    "STOP here and END there, stop words: stop, end, halt.",
] * 20
SPECIALS = ["<eos>", "<pad>"]
TEXT = "Hello café 😀 中文 world! The naïve fox 🎉🚀 said STOP and END of 日本語."


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocabulary leaves rare multibyte characters split across tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"]))
    return tok


def stream(tok, ids, params=None, prompt=(), finish=True):
    """Feed ids one at a time; return (detokenizer, streamed deltas, output_text after each step)."""
    d = IncrementalDetokenizer(tok, list(prompt), params or SP())
    deltas, texts = [], []
    for t in ids:
        stop = d.update([t])
        texts.append(d.output_text)
        deltas.append(d.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            break
    else:
        if finish:
            d.flush()
            deltas.append(d.get_next_output_text(finished=True, delta=True))
    return d, deltas, texts


def test_tokens_really_split_characters(byte_bpe):
    ids = byte_bpe.encode(TEXT).ids
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids), (
        "the test tokenizer should split multibyte chars"
    )


@pytest.mark.parametrize("prompt", ["", "A prompt: 中", "naïve 😀"])
def test_stream_concatenates_to_full_decode_without_broken_utf8(byte_bpe, prompt):
    prompt_ids = byte_bpe.encode(prompt).ids
    ids = byte_bpe.encode(TEXT).ids
    d, deltas, texts = stream(byte_bpe, ids, prompt=prompt_ids)
    assert "".join(deltas) == d.output_text == byte_bpe.decode(ids) == TEXT
    assert all("\ufffd" not in s for s in deltas + texts)
    assert d.output_token_ids == ids


def test_incomplete_character_held_then_flushed(byte_bpe):
    emoji = byte_bpe.encode("😀").ids
    assert len(emoji) > 1
    d = IncrementalDetokenizer(byte_bpe, [], SP())
    d.update(byte_bpe.encode("ok ").ids)
    d.update(emoji[:-1])
    assert d.output_text == "ok "  # nothing of the half emoji yet
    d.update(emoji[-1:])
    assert d.output_text == "ok 😀"
    d.update(emoji[:1])
    assert d.output_text == "ok 😀"
    d.flush()  # the completion ended mid-character: the text shows what a full decode shows
    assert d.output_text == byte_bpe.decode(d.output_token_ids) and d.output_text.endswith("\ufffd")


@pytest.mark.parametrize("stop", ["STOP", "fox 🎉", "中文 w", "é 😀"])
def test_stop_string_across_token_boundaries(byte_bpe, stop):
    ids = byte_bpe.encode(TEXT).ids
    d, deltas, _ = stream(byte_bpe, ids, SP(stop=[stop]))
    assert d.stop_reason == stop
    assert d.output_text == TEXT[: TEXT.index(stop)]
    assert "".join(deltas) == d.output_text  # streaming never sent text the stop string cut


@pytest.mark.parametrize("stop", ["STOP", "fox 🎉"])
def test_include_stop_str_in_output(byte_bpe, stop):
    ids = byte_bpe.encode(TEXT).ids
    d, deltas, _ = stream(byte_bpe, ids, SP(stop=[stop], include_stop_str_in_output=True))
    end = TEXT.index(stop) + len(stop)
    assert d.output_text == TEXT[:end] and "".join(deltas) == d.output_text
    # the tokens that made the stop string are consumed; no text beyond the stop string
    assert len(byte_bpe.decode(d.output_token_ids)) >= end


def test_earliest_of_several_stops_wins(byte_bpe):
    ids = byte_bpe.encode(TEXT).ids
    d, _, _ = stream(byte_bpe, ids, SP(stop=["END", "world", "STOP"]))
    assert d.stop_reason == "world" and d.output_text == "Hello café 😀 中文 "


def test_stop_found_when_one_token_adds_it_whole(byte_bpe):
    d = IncrementalDetokenizer(byte_bpe, [], SP(stop=["lazy"]))
    assert d.update(byte_bpe.encode("the quick brown fox jumps over the lazy dog").ids) == "lazy"
    assert d.output_text == "the quick brown fox jumps over the "
    assert d.update(byte_bpe.encode(" more").ids) is None and d.output_text.endswith("the ")


def test_streaming_holds_back_possible_stop_prefix(byte_bpe):
    d = IncrementalDetokenizer(byte_bpe, [], SP(stop=["END!"]))
    d.update(byte_bpe.encode("Hello EN").ids)
    assert d.output_text == "Hello EN"
    assert d.get_next_output_text(finished=False, delta=True) == "Hello"  # 3 chars held
    assert d.get_next_output_text(finished=False, delta=False) == "Hello"
    assert d.update(byte_bpe.encode("D!").ids) == "END!"
    assert d.output_text == "Hello "
    assert d.get_next_output_text(finished=True, delta=True) == " "
    assert d.get_next_output_text(finished=True, delta=False) == "Hello "


def test_no_holdback_without_stops_or_with_include(byte_bpe):
    for params in (SP(), SP(stop=["xyz"], include_stop_str_in_output=True)):
        d = IncrementalDetokenizer(byte_bpe, [], params)
        d.update(byte_bpe.encode("Hello world").ids)
        assert d.get_next_output_text(finished=False, delta=True) == "Hello world"


def test_min_tokens_ignores_stop_in_first_tokens(byte_bpe):
    ids = byte_bpe.encode("STOP then STOP again").ids
    first_stop_tokens = len(byte_bpe.encode("STOP").ids)
    d, _, _ = stream(byte_bpe, ids, SP(stop=["STOP"], min_tokens=first_stop_tokens, max_tokens=50))
    assert d.stop_reason == "STOP" and d.output_text == "STOP then "


def test_skip_special_tokens(byte_bpe):
    eos = byte_bpe.token_to_id("<eos>")
    ids = byte_bpe.encode("café 😀").ids + [eos] + byte_bpe.encode(" more").ids
    d, deltas, _ = stream(byte_bpe, ids, SP(skip_special_tokens=True))
    assert d.output_text == "café 😀 more" == "".join(deltas)
    d, deltas, _ = stream(byte_bpe, ids, SP(skip_special_tokens=False))
    assert d.output_text == "café 😀<eos> more" == "".join(deltas)


def test_stop_terminated_token_text_not_added(byte_bpe):
    eos = byte_bpe.token_to_id("<eos>")
    d = IncrementalDetokenizer(byte_bpe, [], SP(skip_special_tokens=False))
    d.update(byte_bpe.encode("done").ids)
    d.update([eos], stop_terminated=True)
    assert d.output_text == "done" and d.output_token_ids[-1] == eos
    d = IncrementalDetokenizer(byte_bpe, [], SP(skip_special_tokens=False, include_stop_str_in_output=True))
    d.update(byte_bpe.encode("done").ids + [eos], stop_terminated=True)
    assert d.output_text == "done<eos>"


def test_metaspace_leading_spaces_kept(metaspace_bpe):
    prompt_ids = metaspace_bpe.encode("Hello world,").ids
    text = "the quick brown fox jumps over the lazy dog."
    ids = metaspace_bpe.encode(text).ids  # starts with "▁the": a space before "the"
    d, deltas, _ = stream(metaspace_bpe, ids, prompt=prompt_ids)
    full = metaspace_bpe.decode(prompt_ids + ids)
    assert full.startswith("Hello world,")
    assert d.output_text == "".join(deltas) == full[len("Hello world,") :] == " " + text
