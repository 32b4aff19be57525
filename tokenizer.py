"""Byte-level BPE tokenizer with tiktoken underneath.

Two ways to get one:

    tok = Tokenizer.from_pretrained("path/to/Qwen3-0.6B")   # a Hugging Face Qwen2/Qwen3 checkpoint
    tok = Tokenizer.byte_level()                            # 256 bytes + a few specials, for scratch models

A Hugging Face byte-level BPE vocabulary spells every byte as one printable character (GPT-2's
`bytes_to_unicode` map). Undoing that map gives tiktoken's `mergeable_ranks` (bytes -> rank) with
rank = token id: in a tiktoken-trained vocabulary such as Qwen's, a token's id is its merge priority,
so merges.txt / the "merges" list carries no extra information and is not read.

Encoding follows the Hugging Face `tokenizers` pipeline of a Qwen2 tokenizer.json step by step:
  1. added tokens (`<|im_end|>`, `<think>`, ...) are cut out of the raw text (only when
     `allow_special=True`; longest match wins where two start at the same place);
  2. each remaining piece is NFC-normalised;
  3. the pre-tokenizer regex splits it and byte-level BPE encodes every chunk.

Project defaults (one place):
  * Qwen2's pre-tokenizer pattern `QWEN2_PATTERN` (also used by Qwen2.5/Qwen3) and NFC normalisation when a
    checkpoint has no tokenizer.json (vocab.json path), as transformers' Qwen2Tokenizer does.
  * eos: tokenizer_config.json `eos_token`, else generation_config.json / config.json `eos_token_id`
    (the first one when it is a list), else `<|endoftext|>` when present.
    pad: tokenizer_config.json `pad_token`, else `pad_token_id` from those files, else eos.
  * `Tokenizer.byte_level()`: ids 0..255 are the bytes, specials follow from 256 in the given order,
    eos = first special (`<|endoftext|>`), pad = second (`<|pad|>`) or eos when there is only one.
    No normalisation, so decode(encode(s)) == s for every string. The default specials also hold the
    task markup `<think>`, `</think>`, `<answer>`, `</answer>` (ids 258-261), matched like every
    added token only with `allow_special=True`.
  * decode() drops ids outside the vocabulary (as Hugging Face does), e.g. ids a model with a padded
    embedding table samples above `vocab_size`, and replaces invalid UTF-8 with U+FFFD.
"""

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import tiktoken

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The reasoning/answer markup of the tasks is one token each, as `<think>` is in Qwen3's own vocabulary:
# a scratch model then spends its capacity (and GRPO its 1/|o| loss weight) on the reasoning itself.
BYTE_LEVEL_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<think>", "</think>", "<answer>", "</answer>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character map: printable Latin-1 bytes stand for themselves, the other
    68 bytes (control characters, space, ...) are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in byte_to_char)
    for offset, b in enumerate(shifted):
        byte_to_char[b] = chr(256 + offset)
    return dict(sorted(byte_to_char.items()))


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def token_to_bytes(token: str) -> bytes:
    """Byte-level vocabulary string (e.g. 'Ġhello') -> the bytes it stands for (b' hello')."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError as err:
        raise ValueError(
            f"vocabulary token {token!r} is not byte-level: character {err.args[0]!r} is not in GPT-2's "
            "bytes_to_unicode alphabet; expected a byte-level BPE vocabulary (Qwen/GPT-2 style)"
        ) from None


def bytes_to_token(data: bytes) -> str:
    """Inverse of `token_to_bytes`."""
    return "".join(_BYTE_TO_CHAR[b] for b in data)


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole string (Hugging Face `added_tokens`). `normalized=True` tokens are
    matched after NFC, the others in the raw text; `special` only matters for files we write."""

    content: str
    id: int
    special: bool = True
    normalized: bool = False


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], added_tokens=(), *, pattern: str = QWEN2_PATTERN,
                 nfc: bool = True, eos_id: int | None = None, pad_id: int | None = None):
        """ranks: token bytes -> id (= merge rank, contiguous from 0, all 256 single bytes present);
        added_tokens: AddedToken list; pattern: pre-tokenizer regex; nfc: NFC-normalise text first."""
        _check_contiguous(ranks)
        self._added = _check_added(list(added_tokens), ranks)
        self._ranks = ranks
        self._pattern = pattern
        self._nfc = nfc
        self._enc = tiktoken.Encoding(
            "tokenizer",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens={t.content: t.id for t in self._added},
        )
        self._raw_matcher = _Matcher([t for t in self._added if not t.normalized])
        self._normalized_matcher = _Matcher([t for t in self._added if t.normalized])
        self._added_ids = frozenset(t.id for t in self._added)
        for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not self._is_known(value):
                raise ValueError(f"{name}={value} is not a token id of this tokenizer (vocab_size={self.vocab_size})")
        self._eos_id = eos_id
        self._pad_id = pad_id

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load the tokenizer of a Hugging Face Qwen checkpoint directory: tokenizer.json, or
        vocab.json (+ added tokens from tokenizer_config.json / added_tokens.json) when it is missing."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist; expected a Hugging Face "
                                    "checkpoint directory with tokenizer.json (or vocab.json + merges.txt)")
        if (path / "tokenizer.json").is_file():
            ranks, added, pattern, nfc = _read_tokenizer_json(path / "tokenizer.json")
        elif (path / "vocab.json").is_file():
            ranks, added = _read_vocab_json(path)
            pattern, nfc = QWEN2_PATTERN, True
        else:
            raise FileNotFoundError(f"{path} has neither tokenizer.json nor vocab.json (+ merges.txt); "
                                    "expected the tokenizer files of a Hugging Face Qwen checkpoint")
        eos_id, pad_id = _read_eos_pad(path, ranks, added)
        return cls(ranks, added, pattern=pattern, nfc=nfc, eos_id=eos_id, pad_id=pad_id)

    @classmethod
    def byte_level(cls, special_tokens=BYTE_LEVEL_SPECIAL_TOKENS) -> "Tokenizer":
        """256 single-byte tokens (id = byte value) followed by `special_tokens` (ids 256, 257, ...).
        eos = first special, pad = second special (eos when there is only one); no merges, no NFC."""
        special_tokens = tuple(special_tokens)
        if not special_tokens or not all(isinstance(s, str) and s for s in special_tokens):
            raise ValueError(f"special_tokens={special_tokens!r}: expected at least one non-empty string "
                             "(the first one is eos)")
        ranks = {bytes([b]): b for b in range(256)}
        added = [AddedToken(s, 256 + i) for i, s in enumerate(special_tokens)]
        pad_id = 257 if len(special_tokens) > 1 else 256
        return cls(ranks, added, nfc=False, eos_id=256, pad_id=pad_id)

    def save_pretrained(self, path) -> None:
        """Write tokenizer.json (loadable by Hugging Face `tokenizers` / transformers, same ids) and
        tokenizer_config.json (eos/pad) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(json.dumps(self._tokenizer_json(), ensure_ascii=False), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "bos_token": None, "unk_token": None}
        for key, token_id in (("eos_token", self._eos_id), ("pad_token", self._pad_id)):
            if token_id is not None:
                config[key] = self._token_string(token_id)
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

    # ---- encode / decode ---------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. allow_special=False: added/special token strings are plain text.
        allow_special=True: they become their ids, exactly as Hugging Face `Tokenizer.encode(text)`
        (no tokens are added at the start or end)."""
        if not allow_special:
            return self._enc.encode_ordinary(self._normalize(text))
        ids = []
        for raw_piece, raw_id in self._raw_matcher.split(text):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for piece, piece_id in self._normalized_matcher.split(self._normalize(raw_piece)):
                ids.extend([piece_id] if piece_id is not None else self._enc.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts, allow_special: bool = False) -> list[list[int]]:
        return [self.encode(text, allow_special) for text in texts]

    def decode(self, ids) -> str:
        """Text of `ids`; unknown ids are skipped and invalid UTF-8 becomes U+FFFD."""
        known = [int(i) for i in ids if self._is_known(int(i))]
        return self._enc.decode(known, errors="replace")

    # ---- properties --------------------------------------------------------------------------------

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (BPE tokens plus added tokens)."""
        return self._enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every added token (Qwen: `<|endoftext|>`, `<|im_start|>`, `<think>`, ...) -> id."""
        return {t.content: t.id for t in self._added}

    # ---- helpers -----------------------------------------------------------------------------------

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self._nfc else text

    def _is_known(self, token_id: int) -> bool:
        return 0 <= token_id < len(self._ranks) or token_id in self._added_ids

    def _token_string(self, token_id: int) -> str:
        """How Hugging Face files spell a token: an added token's content, else its vocabulary string."""
        added = {t.id: t.content for t in self._added}
        return added.get(token_id) or bytes_to_token(self._enc.decode_single_token_bytes(token_id))

    def _tokenizer_json(self) -> dict:
        """The Hugging Face tokenizer.json equivalent of this tokenizer. `ignore_merges` makes HF look a
        whole chunk up first, as tiktoken does; merges are every split of a token into two tokens, in
        rank order, so HF's merge priority equals tiktoken's rank priority."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": t.id, "content": t.content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": t.normalized, "special": t.special}
                for t in self._added
            ],
            "normalizer": {"type": "NFC"} if self._nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self._pattern}, "behavior": "Isolated", "invert": False},
                byte_level,
            ]},
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                "vocab": {bytes_to_token(b): rank for b, rank in self._ranks.items()},
                "merges": [f"{bytes_to_token(a)} {bytes_to_token(b)}" for a, b in _merges_from_ranks(self._ranks)],
            },
        }


class _Matcher:
    """Finds added tokens in text, leftmost first and longest among those starting at one place
    (Hugging Face's leftmost-longest rule): a regex alternation tries longer strings first."""

    def __init__(self, tokens):
        self._ids = {t.content: t.id for t in tokens}
        by_length = sorted(self._ids, key=len, reverse=True)
        self._regex = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    def split(self, text: str):
        """Yield (piece, None) for ordinary text and (token, id) for each added token, left to right."""
        if self._regex is None:
            yield text, None
            return
        start = 0
        for match in self._regex.finditer(text):
            if match.start() > start:
                yield text[start:match.start()], None
            yield match.group(), self._ids[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:], None


# ---- reading checkpoint files --------------------------------------------------------------------------

def _read_json(file: Path) -> dict:
    """The JSON object in file; a damaged file is one ValueError line naming it (and the line/column)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not valid JSON: it is not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}; expected an object")
    return data


def _read_tokenizer_json(file: Path):
    """(ranks, added tokens, pattern, nfc) of a Qwen2-style tokenizer.json."""
    data = _read_json(file)
    model = data.get("model")
    model = model if isinstance(model, dict) else {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{file}: model type is {model.get('type')!r}; expected a byte-level 'BPE' model with a vocab")
    ranks = _ranks(model["vocab"], file)
    added_tokens = data.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise ValueError(f"{file}: added_tokens is a {type(added_tokens).__name__}; expected a list")
    added = [_added_token(entry, file) for entry in added_tokens]
    return ranks, added, _read_pattern(data.get("pre_tokenizer"), file), _read_nfc(data.get("normalizer"), file)


def _ranks(vocab: dict, file: Path) -> dict[bytes, int]:
    """token string -> id of a vocabulary object, each id checked to be an integer."""
    bad = next(((token, rank) for token, rank in vocab.items() if type(rank) is not int), None)
    if bad is not None:
        raise ValueError(f"{file}: vocabulary token {bad[0]!r} has id {bad[1]!r}; expected an integer id")
    return {token_to_bytes(token): rank for token, rank in vocab.items()}


def _read_pattern(pre_tokenizer, file: Path) -> str:
    """The Split regex of a Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)] pre-tokenizer."""
    steps = pre_tokenizer.get("pretokenizers") if isinstance(pre_tokenizer, dict) else None
    steps = steps if isinstance(steps, list) and all(isinstance(step, dict) for step in steps) else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"]:
        split, byte_level = steps
        if (isinstance(split.get("pattern"), dict) and "Regex" in split["pattern"] and split.get("behavior") == "Isolated" and not split.get("invert")
                and not byte_level.get("use_regex") and not byte_level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    raise ValueError(f"{file}: unsupported pre_tokenizer {json.dumps(pre_tokenizer)[:300]}; expected Qwen2's Sequence "
                     "of Split(Regex, behavior='Isolated') and ByteLevel(use_regex=false, add_prefix_space=false)")


def _read_nfc(normalizer, file: Path) -> bool:
    if normalizer is None:
        return False
    if normalizer == {"type": "NFC"}:
        return True
    raise ValueError(f"{file}: unsupported normalizer {json.dumps(normalizer)[:300]}; expected NFC or none")


def _added_token(entry: dict, source, token_id=None) -> AddedToken:
    """AddedToken from a tokenizer.json `added_tokens` entry or a tokenizer_config.json
    `added_tokens_decoder` value (whose id is the dict key, passed as `token_id`)."""
    token_id = entry.get("id") if isinstance(entry, dict) and token_id is None else token_id
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not _is_int(token_id):
        raise ValueError(f"{source}: added token entry {json.dumps(entry)[:200]} needs a string 'content' and "
                         "an integer id")
    unsupported = [flag for flag in ("lstrip", "rstrip", "single_word") if entry.get(flag)]
    if unsupported:
        raise ValueError(f"{source}: added token {entry.get('content')!r} sets {unsupported}; "
                         "only plain added tokens (lstrip/rstrip/single_word false) are supported")
    return AddedToken(entry["content"], int(token_id),
                      special=bool(entry.get("special", True)), normalized=bool(entry.get("normalized", False)))


def _is_int(value) -> bool:
    """An integer id, as JSON gives it (an int) or as a JSON object key spells it (digits)."""
    return type(value) is int or (isinstance(value, str) and value.isdigit())


def _read_vocab_json(path: Path):
    """(ranks, added tokens) of a vocab.json checkpoint; added tokens come from tokenizer_config.json
    `added_tokens_decoder` and added_tokens.json."""
    ranks = _ranks(_read_json(path / "vocab.json"), path / "vocab.json")
    added = {}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        decoder = _read_json(config_file).get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ValueError(f"{config_file}: added_tokens_decoder is a {type(decoder).__name__}; expected an object")
        for token_id, entry in decoder.items():
            token = _added_token(entry, config_file, token_id)
            added[token.content] = token
    added_file = path / "added_tokens.json"
    if added_file.is_file():
        for content, token_id in _read_json(added_file).items():
            if not _is_int(token_id):
                raise ValueError(f"{added_file}: {content!r} has id {token_id!r}; expected an integer id")
            token_id = int(token_id)
            if content in added and added[content].id != token_id:
                raise ValueError(f"{added_file}: {content!r} has id {token_id} but tokenizer_config.json "
                                 f"gives {added[content].id}; expected the same id in both")
            added.setdefault(content, AddedToken(content, int(token_id)))
    return ranks, list(added.values())


def _read_eos_pad(path: Path, ranks: dict[bytes, int], added: list[AddedToken]):
    """(eos_id, pad_id) following the project default order documented at the top of this file."""
    by_content = {t.content: t.id for t in added}

    def token_id(token, source):
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        if not isinstance(token, str):
            raise ValueError(f"{source}: special token {token!r} is not a string")
        if token in by_content:
            return by_content[token]
        if all(c in _CHAR_TO_BYTE for c in token) and token_to_bytes(token) in ranks:
            return ranks[token_to_bytes(token)]
        raise ValueError(f"{source}: {token!r} is neither an added token nor a vocabulary token")

    config_file = path / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    eos_id = token_id(config.get("eos_token"), config_file)
    pad_id = token_id(config.get("pad_token"), config_file)
    for name in ("generation_config.json", "config.json"):
        model_config = _read_json(path / name) if (path / name).is_file() else {}
        eos_id = eos_id if eos_id is not None else _first_id(model_config.get("eos_token_id"), path / name)
        pad_id = pad_id if pad_id is not None else _first_id(model_config.get("pad_token_id"), path / name)
    if eos_id is None:
        eos_id = by_content.get("<|endoftext|>")
    return eos_id, pad_id if pad_id is not None else eos_id


def _first_id(value, source) -> int | None:
    """A token id field that may be a list (the first one counts) or absent."""
    first = (value[0] if value else None) if isinstance(value, list) else value
    if first is not None and type(first) is not int:
        raise ValueError(f"{source}: token id {value!r} is not an integer")
    return first


# ---- validation and merges ------------------------------------------------------------------------------

def _check_contiguous(ranks: dict[bytes, int]) -> None:
    """tiktoken ranks must be exactly 0..n-1: a gap or a repeated id means the vocabulary is not a
    rank-ordered BPE vocabulary and rank = id would be wrong."""
    ids = sorted(ranks.values())
    if ids != list(range(len(ids))):
        position = next(i for i, token_id in enumerate(ids) if token_id != i)
        raise ValueError(f"vocabulary ids are not contiguous: expected 0..{len(ids) - 1}, but the sorted ids "
                         f"have {ids[position]} where {position} belongs (a gap or a repeated id); expected a "
                         "byte-level BPE vocabulary whose ids are its merge ranks")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"vocabulary lacks single-byte tokens for bytes {missing[:8]}; expected all 256 bytes")


def _check_added(added: list[AddedToken], ranks: dict[bytes, int]) -> list[AddedToken]:
    """Added tokens sorted by id; an id may coincide with a vocabulary id only for the same string."""
    by_id = {rank: token for token, rank in ranks.items()}
    contents, ids = set(), set()
    for token in added:
        if not token.content or token.content in contents or token.id in ids or token.id < 0:
            raise ValueError(f"added token {token.content!r} (id {token.id}) is empty, negative or duplicated; "
                             "expected distinct non-empty strings with distinct ids")
        if token.id in by_id and bytes_to_token(by_id[token.id]) != token.content:
            raise ValueError(f"added token {token.content!r} has id {token.id}, which is the vocabulary token "
                             f"{bytes_to_token(by_id[token.id])!r}; expected added tokens after the vocabulary")
        contents.add(token.content)
        ids.add(token.id)
    return sorted(added, key=lambda t: t.id)


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of a multi-byte token into two tokens, ordered by the token's rank
    (then by the parts' ranks): the merge list that makes HF's BPE pick tiktoken's merges."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]
