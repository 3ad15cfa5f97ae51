"""The tokenizer as GGUF metadata (tokenizer.ggml.*, tokenizer.chat_template), read once before any weight.

- Byte-level BPE (GPT-2 style: Llama-3, Qwen2/3, SmolLM, Mistral-Nemo/Tekken, gpt-oss's o200k): model `gpt2`, tokens in id order with
  their types, merges, and the pre-tokenizer llama.cpp must reproduce, recognised from tokenizer.json's own
  pre-tokenizer (split regex, digit splitting) rather than from a table of tokenizer hashes.
- SentencePiece (Llama-2, Mistral-7B): model `llama` with scores, from tokenizer.model when the
  `sentencepiece` package is there, else from the byte-fallback BPE tokenizer.json (scores from its id order).
- A .gguf source: its tokenizer metadata is copied as it is.
Special-token ids, add_bos/add_eos and the chat template come from the HF files through `gguf.SpecialVocab`;
add_bos/add_eos are then set to what the HF tokenizer actually does, so llama.cpp adds what transformers adds.

transformers is imported where it is used: this module is on the import path of `quant --help`, to which
AutoTokenizer adds ~1.4 s (2 cores).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from quant.errors import UserError

log = logging.getLogger(__name__)

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS +
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS +
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # gpt-oss (o200k)
_SPLIT_PRE = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _TEKKEN: "tekken", _O200K: "gpt-4o"}


@dataclass
class Vocab:
    """Tokenizer metadata ready to add to a GGUFWriter: (key, value, type, array sub-type) entries."""

    entries: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = field(default_factory=list)
    special: gguf.SpecialVocab | None = None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        for key, value, vtype, sub in self.entries:
            w.add_key_value(key, value, vtype, sub_type=sub)
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)


def _pre_steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, or None if it has none."""
    steps = _pre_steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), None)
    if len(splits) == 1 and splits[0] in _SPLIT_PRE and kinds == ["Split", "ByteLevel"]:
        return _SPLIT_PRE[splits[0]]
    if byte_level is not None and byte_level.get("use_regex", True):
        digits = [s for s in steps if s.get("type") == "Digits"]
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and digits[0].get("individual_digits"):
            return "smollm"  # digits one by one, then GPT-2's regex: llama.cpp's starcoder/smollm family
    return None


def _special_flags(tokenizer) -> dict[str, bool]:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bool(ids) and bos is not None and ids[0] == bos,
            "eos": bool(ids) and eos is not None and ids[-1] == eos and len(ids) > 1}


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def _byte_bpe_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif text in added:
            special = decoder[i].special if i in decoder else False
            tokens.append(text if special or _looks_special(text) else text.replace("\u2581", " "))
            types.append(TokenType.CONTROL if special or _looks_special(text) else TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    return tokens, types


def _spm_tokens(path: Path, tokenizer, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    vocab = None
    if (path / "tokenizer.model").is_file():
        try:
            vocab = gguf.SentencePieceVocab(path)
        except (ImportError, TypeError):  # the sentencepiece package is missing: read tokenizer.json instead
            vocab = None
    if vocab is None:
        try:
            vocab = gguf.LlamaHfVocab(path)
        except (FileNotFoundError, TypeError) as e:
            raise UserError(f"tokenizer {path}: not a SentencePiece tokenizer.json ({e}); with only tokenizer.model, "
                            "pip install sentencepiece") from None
    tokens, scores, types = [], [], []
    for i, (text, score, ttype) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        # LlamaHfVocab gives every token the same score; llama.cpp's SPM tokenizer merges by score, and the
        # ids of a byte-fallback BPE vocabulary are in merge order, so rank by id.
        scores.append(float(score) if isinstance(vocab, gguf.SentencePieceVocab) else -float(i))
        types.append(int(ttype))
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return tokens[:n_vocab], scores[:n_vocab], types[:n_vocab]


def vocab_from_dir(path: str | Path, n_vocab: int) -> Vocab:
    """Tokenizer metadata of the HF tokenizer saved in `path`, padded to the model's `n_vocab` rows."""
    from transformers import AutoTokenizer

    path = Path(path)
    tj_file = path / "tokenizer.json"
    if not tj_file.is_file() and not (path / "tokenizer.model").is_file():
        raise UserError(f"tokenizer {path}: no tokenizer.json or tokenizer.model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise UserError(f"tokenizer {path}: cannot be loaded ({str(e).splitlines()[0]})") from None
    if len(tokenizer) > n_vocab:
        raise UserError(f"tokenizer {path} has {len(tokenizer)} tokens but the model only {n_vocab} embedding rows")
    model = json.loads(tj_file.read_text(encoding="utf-8"))["model"] if tj_file.is_file() else {"type": "Unigram"}
    spm = model.get("type") != "BPE" or model.get("byte_fallback", False)
    A, S = GGUFValueType.ARRAY, GGUFValueType.STRING
    if spm:
        tokens, scores, types = _spm_tokens(path, tokenizer, n_vocab)
        entries = [("tokenizer.ggml.model", "llama", S, None), ("tokenizer.ggml.pre", "default", S, None),
                   ("tokenizer.ggml.tokens", tokens, A, S), ("tokenizer.ggml.scores", scores, A, GGUFValueType.FLOAT32)]
    else:
        pre = pre_tokenizer_name(json.loads(tj_file.read_text(encoding="utf-8")))
        if pre is None:
            log.warning("tokenizer %s: pre-tokenizer not recognised; llama.cpp will use its default regex and may "
                        "split some text differently from transformers", path)
        tokens, types = _byte_bpe_tokens(tokenizer, n_vocab)
        entries = [("tokenizer.ggml.model", "gpt2", S, None)] + ([("tokenizer.ggml.pre", pre, S, None)] if pre else [])
        entries.append(("tokenizer.ggml.tokens", tokens, A, S))
    entries.append(("tokenizer.ggml.token_type", [int(t) for t in types], A, GGUFValueType.INT32))
    special = gguf.SpecialVocab(path, load_merges=not spm, n_vocab=n_vocab)
    if not spm and not special.merges:
        # llama.cpp refuses a gpt2 vocabulary without merges and GGUF cannot store an empty array: one merge of
        # two multi-character strings never fires (BPE symbols start as single characters and only merges grow
        # them), so a merge-free tokenizer (every byte a token) keeps its meaning.
        special.merges = ["<|no|> <|merges|>"]
    special.add_special_token.update(_special_flags(tokenizer))
    return Vocab(entries, special)


def vocab_from_gguf(path: str | Path) -> Vocab:
    """The tokenizer metadata of an existing GGUF file, copied key by key with its types."""
    reader = gguf.GGUFReader(str(path))
    entries = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1]
            value = [bytes(f.parts[i]) if sub == GGUFValueType.STRING else f.parts[i].tolist()[0] for i in f.data]
            entries.append((key, value, vtype, sub))
        else:
            entries.append((key, f.contents(), vtype, None))
    if not entries:
        raise UserError(f"{path}: holds no tokenizer metadata to copy")
    return Vocab(entries)
