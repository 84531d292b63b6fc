"""SentencePiece tokenizer (`--tokenizer-model`) whose detokenize(tokenize(text)) == text exactly.

Models trained by tools/train_tokenizer.py use identity normalisation, keep every space, no dummy
prefix, and byte fallback, so any string round-trips. The one character sentencepiece cannot carry
as text is U+2581 ("▁", its own space marker); we encode it as its three UTF-8 byte pieces.
"""
from __future__ import annotations

import os

import sentencepiece as spm

SPACE_MARKER = "\u2581"
EOD_PIECE = "<eod>"
PAD_PIECE = "<pad>"


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"{self.model_path}: tokenizer model not found")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.model_path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with long text
            raise ValueError(f"{self.model_path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size: int = self._sp.GetPieceSize()
        # End of document is the model's </s> (eos); padding is its pad piece, or eod if it has none.
        self.eod_id: int = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(f"{self.model_path}: model has no end-of-document (eos) piece")
        self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id
        marker_bytes = SPACE_MARKER.encode("utf-8")
        ids = [self._sp.PieceToId(f"<0x{b:02X}>") for b in marker_bytes]
        self._marker_ids = ids if all(i != self._sp.unk_id() for i in ids) else None

    def tokenize(self, text: str) -> list[int]:
        if SPACE_MARKER not in text or self._marker_ids is None:
            return self._sp.EncodeAsIds(text)
        out: list[int] = []
        parts = text.split(SPACE_MARKER)
        for k, part in enumerate(parts):
            if k:
                out.extend(self._marker_ids)
            if part:
                out.extend(self._sp.EncodeAsIds(part))
        return out

    def detokenize(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._sp.DecodeIds(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))
