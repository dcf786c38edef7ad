"""CLIP tokenizer files (``vocab.json``, ``merges.txt``) derived offline from open_clip's shipped BPE.

open_clip bundles OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``. OpenAI's tokenizer keeps its first
48894 merges and builds the vocabulary as: the 256 byte symbols, the same with ``</w>``, one token per
merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (49408 tokens). Writing both lists in the
Hugging Face layout gives a ``CLIPTokenizer`` with the same ids as open_clip.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

N_MERGES = 48894
VOCAB_SIZE = 49408
START, END = "<|startoftext|>", "<|endoftext|>"


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locate without importing (the import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is needed to generate the CLIP tokenizer files")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in vocabulary order (GPT-2's reversible byte map)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # mapped to themselves
    n_other = 256 - len(printable)  # the rest map to chr(256), chr(257), … in byte order
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(n_other)]


def merges() -> list[str]:
    """The merge rules, ``"a b"`` per line, without the file's header line."""
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as fh:
        return fh.read().split("\n")[1:N_MERGES + 1]


def vocabulary(merge_lines: list[str]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merge_lines] + [START, END]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary must have {VOCAB_SIZE} tokens, built {len(tokens)}")
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rules = merges()
    (out / "vocab.json").write_text(json.dumps(vocabulary(rules), ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(rules) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": START, "eos_token": END,
              "unk_token": END, "pad_token": END, "do_lower_case": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1), encoding="utf-8")
    return out
