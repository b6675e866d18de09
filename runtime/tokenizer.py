"""Tokenizer: text <-> token ids and chat templates, on the `tokenizers` library (no transformers at run time).

Owns one `tokenizers.Tokenizer` plus what transformers keeps beside it: the named
special tokens, whether BOS/EOS are added, the EOS ids generation stops on, and the
chat template. Built from a Hugging Face tokenizer.json (+ tokenizer_config.json)
or from a GGUF file's tokenizer metadata; either way encode/decode/chat templates
give what transformers gives for the same files.

CPU only; thread-safe for concurrent encode/decode (the backend is immutable after build).
`encode` releases the GIL while the Rust tokenizer runs (the batch entry point does, the
single-text one does not), so a long text encoded in a worker thread leaves other threads
(an event loop) running.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerLoadError(ValueError):
    """A tokenizer file is missing, unreadable or describes a tokenizer we cannot build."""


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        # Like transformers 5: the clean-up (strip spaces before punctuation) is for WordPiece only;
        # on BPE vocabularies it would corrupt text.
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces and isinstance(
            backend.model, models.WordPiece
        )
        self._max_chars_per_token: int | None | bool = False  # computed on first use
        self.bos_token_id = self._id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id(self.special_tokens.get("eos_token"))
        self.pad_token_id = self._id(self.special_tokens.get("pad_token"))
        eos = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: set[int] = eos
        """Token ids that end generation: the tokenizer's EOS plus the model's (generation_)config eos ids."""
        self.all_special_ids: list[int] = sorted(
            {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
            | {i for i in (self._id(v) for v in self.special_tokens.values()) if i is not None}
        )

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (transformers' len(tokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch_fast runs without the GIL (encode() holds it: a 2M-character text froze every
        # other thread for 1 s) and skips the offsets nobody reads; the ids are the same.
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def max_chars_per_token(self) -> int | None:
        """An upper bound on the input characters one token can stand for, or None where the pipeline
        has no such bound. A text longer than n times this needs more than n tokens, which lets a
        server refuse an oversized prompt before tokenizing it.

        Known only for pipelines that keep every input character (byte-level / Metaspace / digit /
        regex-split pre-tokenizers, no normalizer or Prepend/Replace/NFC/NFKC) with a BPE model that
        never fuses unknown text into one token: then a token covers at most as many characters as
        its own (byte-level or SentencePiece) spelling has; NFC/NFKC may compose up to 4 characters
        into one, hence a factor 4.
        """
        if self._max_chars_per_token is False:
            self._max_chars_per_token = _max_chars_per_token(self.backend)
        return self._max_chars_per_token

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs,
    ):
        """Render messages with the model's chat template (sandboxed jinja2, as transformers does).

        Extra keyword arguments (tools, documents, enable_thinking, ...) reach the template as variables.
        continue_final_message: end the prompt inside the last message (no end-of-turn after it), so the
        model continues that message (a prefilled assistant reply); excludes add_generation_prompt.
        Returns the prompt string, or its token ids with tokenize=True (no special tokens added:
        the template writes them itself).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise NoChatTemplateError(
                "this tokenizer has no chat template; pass chat_template= or use a plain prompt"
            )
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        text = _compile_template(template).render(
            messages=_plain(messages), add_generation_prompt=add_generation_prompt, **_plain(variables)
        )
        if continue_final_message:
            text = _cut_after_final_message(text, messages)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From a directory holding tokenizer.json (+ tokenizer_config.json), or a tokenizer.json path."""
        tok_file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        folder = os.path.dirname(tok_file)
        if not os.path.isfile(tok_file):
            raise TokenizerLoadError(
                f"no tokenizer.json in {path!r} (only fast-tokenizer files are supported)"
            )
        try:
            backend = _Backend.from_file(tok_file)
        except Exception as e:  # tokenizers raises plain Exception on malformed JSON
            raise TokenizerLoadError(f"cannot read tokenizer file {tok_file!r}: {e}") from e
        config: dict[str, Any] = {}
        cfg_file = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        jinja_file = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_file):  # newer repos keep the template in its own file
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        elif isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {name: _token_str(config.get(name)) for name in _SPECIAL_NAMES}
        _add_missing_special_tokens(backend, special.values())
        # tokenizer.json's own post-processor decides BOS/EOS (transformers 5 ignores the config's
        # add_bos_token next to a tokenizer.json); the config only fills in when there is none.
        if backend.post_processor is None:
            _set_template_processing(
                backend, special, config.get("add_bos_token", False), config.get("add_eos_token", False)
            )
        return cls(
            backend,
            special,
            template,
            extra_eos_token_ids,
            bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From GGUF key/values (`tokenizer.ggml.*`, `tokenizer.chat_template`), as read by the GGUF loader."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerLoadError("the GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
        types = meta.get("tokenizer.ggml.token_type") or []
        if kind == "gpt2":
            backend = _byte_level_bpe(
                tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre")
            )
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(
                tokens,
                meta.get("tokenizer.ggml.scores"),
                meta.get("tokenizer.ggml.merges"),
                meta.get("tokenizer.ggml.add_space_prefix", True),
            )
            add_bos_default = (
                True  # llama.cpp adds BOS to sentencepiece vocabularies that don't say otherwise
            )
        else:
            raise TokenizerLoadError(
                f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')"
            )
        # llama.cpp token types: 3 = control (special, never split), 4 = user-defined (kept whole, not special).
        alphabet = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, types)
            if ty == 3 and (alphabet is None or set(t) <= alphabet)
        ]
        if control:
            backend.add_special_tokens(control)
        user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
        if user:
            backend.add_tokens(user)
        special = {}
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            idx = meta.get(f"tokenizer.ggml.{key}")
            if idx is not None and 0 <= idx < len(tokens):
                special[name] = tokens[idx]
        _add_missing_special_tokens(backend, special.values())
        _set_template_processing(
            backend,
            special,
            meta.get("tokenizer.ggml.add_bos_token", add_bos_default),
            meta.get("tokenizer.ggml.add_eos_token", False),
        )
        return cls(backend, special, meta.get("tokenizer.chat_template"), extra_eos_token_ids)


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _add_missing_special_tokens(backend: _Backend, tokens: Iterable[str | None]) -> None:
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True, normalized=False) for t in tokens if t and t not in added]
    if missing:
        backend.add_special_tokens(missing)


def _merge_pairs(merges: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges as stored ("a b") -> (a, b) pairs."""
    pairs = []
    for m in merges:
        a, b = m.split(" ", 1)
        pairs.append((a, b))
    return pairs


def _set_template_processing(
    backend: _Backend, special: Mapping[str, str | None], add_bos: bool, add_eos: bool
) -> None:
    """The BOS/EOS post-processor transformers installs when add_bos_token/add_eos_token are stated."""
    bos = special.get("bos_token") if add_bos else None
    eos = special.get("eos_token") if add_eos else None
    single = f"{bos + ':0 ' if bos is not None else ''}$A:0{' ' + eos + ':0' if eos is not None else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos is not None else ''} $B:1{' ' + eos + ':1' if eos is not None else ''}"
    toks = ([(bos, backend.token_to_id(bos))] if bos is not None else []) + (
        [(eos, backend.token_to_id(eos))] if eos is not None else []
    )
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=toks)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` names -> the split regex its vocabulary was trained with.
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> _Backend:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    backend = _Backend(
        models.BPE(
            vocab,
            _merge_pairs(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    if pre in _PRE_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        # SmolLM's own tokenizer.json (and llama.cpp) split every digit before the GPT-2 regex.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, merges: list[str] | None, add_space_prefix: bool
) -> _Backend:
    """llama.cpp's "llama" vocabulary: SentencePiece BPE with byte fallback (Llama 2, Mistral v0.x)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = _merge_pairs(merges)
    else:  # SentencePiece files carry scores, not merges: rebuild them, best score first
        if scores is None:
            raise TokenizerLoadError("GGUF 'llama' tokenizer has neither merges nor scores")
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk = tokens[0] if tokens and tokens[0] == "<unk>" else None
    backend = _Backend(
        models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "Sequence"}
_KEEPING_NORMALIZERS = {"Prepend": 1, "Replace": 1, "NFC": 4, "NFKC": 4, "Sequence": 1}


def _max_chars_per_token(backend: _Backend) -> int | None:
    spec = json.loads(backend.to_str())
    factor = 1

    def walk(node, allowed, key):
        nonlocal factor
        if node is None:
            return True
        kind = node.get("type")
        if kind not in allowed:
            return False
        if kind == "Split" and str(node.get("behavior", "")).lower() == "removed":
            return False
        if kind == "Replace":
            pattern = next(iter((node.get("pattern") or {"": ""}).values()))
            if len(node.get("content", "")) < len(str(pattern)):
                return False  # a shrinking replacement: the text gets shorter than its tokens suggest
        if allowed is _KEEPING_NORMALIZERS:
            factor = max(factor, allowed[kind])
        return all(walk(child, allowed, key) for child in node.get(key, []) or [])

    if not walk(spec.get("normalizer"), _KEEPING_NORMALIZERS, "normalizers"):
        return None
    if not walk(spec.get("pre_tokenizer"), _KEEPING_PRE_TOKENIZERS, "pretokenizers"):
        return None
    model = spec.get("model") or {}
    fuses_unknown = model.get("unk_token") and model.get("fuse_unk") and not model.get("byte_fallback")
    if model.get("type") != "BPE" or fuses_unknown:
        return None
    longest = max((len(t) for t in backend.get_vocab(with_added_tokens=True)), default=1)
    return max(longest, 1) * factor


def _clean_up_tokenization(s: str) -> str:
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        s = s.replace(a, b)
    return s


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types: rich objects must not reach the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):  # pydantic protocol objects
        return _plain(value.model_dump(exclude_none=True))
    if isinstance(value, str):  # subclasses (enums) may carry methods the sandbox doesn't know
        return str.__str__(value)
    if isinstance(value, (int, float)):
        return (float if isinstance(value, float) else int)(value)
    return str(value)


class NoChatTemplateError(ValueError):
    """The tokenizer has no chat template and none was given."""


def _cut_after_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    # As transformers does: the rendered prompt ends where the final message's text ends; what the
    # template wrote after it (end-of-turn tokens) goes. Templates may strip the content: match it stripped.
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    content = (content or "").strip()
    if not content:
        raise ValueError("continue_final_message needs a final message with text content")
    end = text.rfind(content)
    if end < 0:
        raise ValueError(
            "continue_final_message: the chat template does not write the final message's text verbatim"
        )
    return text[: end + len(content)]


@lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' (and so every template) expects plain JSON.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}` marks assistant spans for training masks; rendering just passes the body through.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


compile_chat_template = _compile_template
"""Compile (and cache) a chat template with the sandboxed environment the tokenizer renders it in."""
