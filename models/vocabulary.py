"""The one vocabulary of text and image tokens: where every id sits, and how a sequence is laid out.

    vocab = Vocabulary(text_vocab_size=text.vocab_size, text_tokenizer_id=text.id, codebook_size=K,
                       grid=(h, w), image_tokenizer_id=tok.id, max_text_tokens=128)
    seq = vocab.sequence(text.encode(caption), grid_tokens)            # int32 ids, text-first
    vocab.parse(seq)                                                   # order, text ids, (h, w) tokens
    vocab.extend(text).save("export/tokenizer.json")                   # decodes rows, names <img_N>
    vocab.to_dict()                                                    # layout.json: every offset, written down

Used by `vqtok export-lm` (rows of ids), by the prior trained on them, and by
`vqtok decode-sequence` (ids back to a caption and a picture). Nothing else computes an offset.

Layout (T = the text tokenizer's vocab_size, K = the image tokenizer's codebook size):

    id                     token
    0 .. T-1               the text tokenizer's own ids, unchanged
    T + 0                  <pad>     pads rows; never inside a sample
    T + 1                  <bos>     first id of every sequence
    T + 2                  <eot>     end of text: ends the caption in image-first sequences
    T + 3                  <boi>     begin image
    T + 4                  <eoi>     end image
    T + 5 + c              <img_c>   image code c, c = 0 .. K-1   (image_offset = T + 5)
    size = T + 5 + K

Sequences, one image each (h*w image ids in raster order: row by row, left to right):

    text-first  (default)  <bos> caption <boi> img ... img <eoi>
    image-first            <bos> <boi> img ... img <eoi> caption <eot>
    unconditional          <bos> <boi> img ... img <eoi>    (text-first with the empty caption)

- The caption is the text tokenizer's ids without its own special tokens (models/text_tokenizer.py).
  A caption longer than max_text_tokens keeps its first max_text_tokens ids (`truncate`, the one
  rule the export and the prior share). A null caption is the empty caption: zero text ids. So the
  unconditional branch of classifier-free guidance is `<bos> <boi>`, the prefix Lumina-mGPT's
  unconditional branch starts from, and a model trained with some empty captions learns it.
- Text-first sequences need no end-of-text: `<boi>` ends the caption. Image-first sequences end
  the caption with `<eot>`, so a model that captions knows when to stop.
- "both" (ORDERS) is an export option: each image written in both orders, one sequence each.
- `parse` tells the orders apart by what follows <bos>: <boi> starts an image-first sequence, unless
  nothing follows the image (`<bos> <boi> image <eoi>`: the unconditional sequence, read as
  text-first; an image-first one with an empty caption has its <eot>). Generated sequences are read
  leniently where the meaning is clear (a whole image without <eoi>: noted) and refused where it is
  not (an image span of the wrong length: `errors` says how many of h*w tokens it has).
- Truncation counts ids, so a byte-level caption can be cut inside a character; it then decodes
  with U+FFFD at the end. Cut captions are counted by the export.

Where this comes from, and why:

- Text ids first and unchanged, new tokens appended after them: Emu3 appends its 32,768 visual
  tokens after the Qwen text vocabulary; Show-o's image token is code + len(text tokenizer). An
  existing LLM can then be fine-tuned on the export by resizing its embeddings, and its own
  tokenizer.json, extended (`extend`), still encodes and decodes its text the same way.
- One begin-image and one end-image token around the image's codes: Chameleon (begin-image,
  1,024 codes, end-image), also Emu3, Show-o (soi/eoi) and Janus. The end token lets a model close
  the image and lets a reader check that a generated image span is whole.
- One output space for text and image ids with a BOS first: DALL-E (text then image, `<bos>` first).
  DALL-E also keeps text and image positions apart with a logits mask; the layout makes that
  possible here too (text ids < T <= specials < image_offset <= image ids).
- Image ids only from a fixed grid, conditioned on text: LlamaGen's t2i conditions on text features
  instead of tokens; vqtok puts the caption in the sequence so any decoder-only LM can train on it.
- No row-break token and no grid size in the sequence: Emu3 and Lumina-mGPT put an end-of-line token
  after every row and the grid size before the image, because their images come at many sizes.
  A vqtok token dataset has one grid (one image tokenizer, one image size), so the grid is written
  once, in the layout (`to_dict()`, the export's layout.json), and every image span has exactly
  h*w ids: a reader checks its length instead of counting row breaks, and no ids are spent on them.
- The layout written down, not implied: `to_dict()` gives every special id, the image offset, K,
  the grid and both tokenizers' ids (implicit offsets are what MMaDA #49 and
  vector-quantize-pytorch #28 users trip over). `from_tokenizer` recovers it from an extended
  tokenizer.json alone (by name: `<boi>`, `<img_0>`, the count of `<img_N>`).

The extended tokenizer.json names the new tokens as special AddedTokens, so
`Tokenizer.from_file(DIR/tokenizer.json).decode(row, skip_special_tokens=True)` is the caption and
`id_to_token(image_offset + c)` is "<img_c>". Its own post-processor (an LLM's BOS) is kept as
shipped: encoding a prompt for the export's layout goes through TextTokenizer.encode (no specials)
and `sequence`, not through the extended tokenizer's encode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

FORMAT = "vqtok-lm-layout"
VERSION = 1
ORDERS = ("text-first", "image-first", "both")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eot>", "<boi>", "<eoi>")
IMAGE_TOKEN = "<img_{}>"
_IMAGE_TOKEN_RE = re.compile(r"<img_(\d+)>")
SEQUENCE_LAYOUTS = {
    "text-first": "<bos> caption[:max_text_tokens] <boi> image(h*w ids, raster order) <eoi>",
    "image-first": "<bos> <boi> image(h*w ids, raster order) <eoi> caption[:max_text_tokens] <eot>",
    "unconditional": "<bos> <boi> image(h*w ids, raster order) <eoi>  (text-first, empty caption)",
}


@dataclass(frozen=True)
class Parsed:
    """A sequence read back. `tokens` is the (h, w) grid of codes, or None when the image span is
    missing or malformed; `errors` says why (what makes the sequence unusable), `notes` what was
    tolerated (no <eoi> after a whole image, trailing ids, padding)."""

    order: str
    text_ids: list[int]
    tokens: np.ndarray | None
    errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class Vocabulary:
    text_vocab_size: int
    text_tokenizer_id: str
    codebook_size: int
    grid: tuple[int, int]
    image_tokenizer_id: str
    max_text_tokens: int = 128

    def __post_init__(self):
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        if self.text_vocab_size < 1:
            raise ValueError(f"text_vocab_size {self.text_vocab_size}: must be at least 1")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size {self.codebook_size}: must be at least 1")
        if min(self.grid) < 1:
            raise ValueError(f"grid {self.grid}: both sides must be at least 1")
        if self.max_text_tokens < 0:
            raise ValueError(f"max_text_tokens {self.max_text_tokens}: must be 0 or more")

    # --- ids ----------------------------------------------------------------------------------
    @property
    def pad(self) -> int:
        return self.text_vocab_size

    @property
    def bos(self) -> int:
        return self.text_vocab_size + 1

    @property
    def eot(self) -> int:
        return self.text_vocab_size + 2

    @property
    def boi(self) -> int:
        return self.text_vocab_size + 3

    @property
    def eoi(self) -> int:
        return self.text_vocab_size + 4

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size + len(SPECIAL_TOKENS)

    @property
    def size(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def image_span(self) -> int:
        return self.grid[0] * self.grid[1]

    def special_tokens(self) -> dict[str, int]:
        """{"<pad>": id, "<bos>": id, ...}"""
        return {n: self.text_vocab_size + i for i, n in enumerate(SPECIAL_TOKENS)}

    def token_name(self, i: int) -> str:
        """What an id is: "text 17", "<boi>", "<img_5>"."""
        i = int(i)
        self._check_ids(np.asarray([i]))
        if i < self.text_vocab_size:
            return f"text {i}"
        if i < self.image_offset:
            return SPECIAL_TOKENS[i - self.text_vocab_size]
        return IMAGE_TOKEN.format(i - self.image_offset)

    # --- building sequences -------------------------------------------------------------------
    def truncate(self, text_ids) -> tuple[list[int] | np.ndarray, bool]:
        """(the first max_text_tokens ids, were any cut). None (a null caption) is the empty caption."""
        if text_ids is None:
            return [], False
        cut = len(text_ids) > self.max_text_tokens
        return (text_ids[: self.max_text_tokens] if cut else text_ids), cut

    def sequence(self, text_ids, image_tokens, order: str = "text-first") -> np.ndarray:
        """One sample's ids (int32). `text_ids`: the caption's text ids (None or [] for no caption),
        truncated here; `image_tokens`: the image's h*w codes in [0, K), flat or (h, w)."""
        if order not in ("text-first", "image-first"):
            raise ValueError(f"order {order!r}: a sequence is 'text-first' or 'image-first' "
                             f"('both' means one sequence of each)")
        text, _ = self.truncate(text_ids)
        text = np.asarray(text, dtype=np.int64).reshape(-1)
        if text.size and (text.min() < 0 or text.max() >= self.text_vocab_size):
            bad = int(text[(text < 0) | (text >= self.text_vocab_size)][0])
            raise ValueError(f"text id {bad} is outside the text vocabulary [0, {self.text_vocab_size}): "
                             f"were the captions encoded with another text tokenizer than {self.text_tokenizer_id}?")
        codes = np.asarray(image_tokens, dtype=np.int64).reshape(-1)
        if codes.size != self.image_span:
            raise ValueError(f"image tokens: {codes.size} given, the grid {self.grid[0]}x{self.grid[1]} needs "
                             f"{self.image_span}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            bad = int(codes[(codes < 0) | (codes >= self.codebook_size)][0])
            raise ValueError(f"image token {bad} is outside the codebook [0, {self.codebook_size})")
        image = np.concatenate([[self.boi], codes + self.image_offset, [self.eoi]])
        if order == "text-first":
            parts = [[self.bos], text, image]
        else:
            parts = [[self.bos], image, text, [self.eot]]
        return np.concatenate(parts).astype(np.int32)

    # --- reading sequences --------------------------------------------------------------------
    def parse(self, ids) -> Parsed:
        """A sequence in this vocabulary, written by vqtok or generated by a model, read back.
        Ids outside the vocabulary raise ValueError; a malformed layout gives a Parsed with errors."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._check_ids(ids)
        ids = ids.tolist()
        notes: list[str] = []
        n_pad = 0
        while ids and ids[-1] == self.pad:
            ids.pop()
            n_pad += 1
        if n_pad:
            notes.append(f"{n_pad} trailing <pad> ignored")
        if ids and ids[0] == self.bos:
            ids = ids[1:]
        else:
            notes.append("no <bos> at the start")
        if self.boi not in ids:
            text, bad = self._text(ids, "the caption")
            return Parsed("text-first", text, None,
                          (f"no <boi>: the sequence has no image ({len(ids)} ids after <bos>)", *bad), tuple(notes))
        start = ids.index(self.boi)
        if start == 0:  # image-first (<boi> image <eoi> caption <eot>), or text-first with the empty caption
            tokens, rest, image_errors = self._image(ids[1:], notes)
            if not rest:  # nothing after the image: the unconditional text-first sequence
                return Parsed("text-first", [], tokens, tuple(image_errors), tuple(notes))
            end = rest.index(self.eot) if self.eot in rest else None
            if end is None:
                notes.append("no <eot> after the caption (cut short?)")
            elif end + 1 < len(rest):
                notes.append(f"{len(rest) - end - 1} ids after <eot> ignored")
            text, bad = self._text(rest[:end], "the caption after the image")
            return Parsed("image-first", text, tokens, tuple(image_errors + bad), tuple(notes))
        text, bad = self._text(ids[:start], "the caption")
        tokens, rest, image_errors = self._image(ids[start + 1:], notes)
        if rest:
            notes.append(f"{len(rest)} ids after <eoi> ignored")
        return Parsed("text-first", text, tokens, tuple(bad + image_errors), tuple(notes))

    def _text(self, ids: list[int], where: str) -> tuple[list[int], list[str]]:
        bad = [(p, i) for p, i in enumerate(ids) if i >= self.text_vocab_size]
        errors = [(f"{where} holds {len(bad)} non-text ids (first: {self.token_name(bad[0][1])} at position "
                   f"{bad[0][0]}); they are left out of the caption")] if bad else []
        return [i for i in ids if i < self.text_vocab_size], errors

    def _image(self, ids: list[int], notes: list[str]) -> tuple[np.ndarray | None, list[int], list[str]]:
        """The image span after <boi>: (tokens or None, the ids after it, errors). Without an <eoi>
        the span is the run of image ids that follows (at most h*w)."""
        n = self.image_span
        if self.eoi in ids:
            end = ids.index(self.eoi)
            span, rest = ids[:end], ids[end + 1:]
        else:
            end = 0
            while end < min(len(ids), n) and ids[end] >= self.image_offset:
                end += 1
            span, rest = ids[:end], ids[end:]
        codes = [i - self.image_offset for i in span if i >= self.image_offset]
        errors = []
        if len(codes) != n:
            errors.append(f"image span has {len(codes)} of {n} tokens ({self.grid[0]}x{self.grid[1]} grid)"
                          + ("" if self.eoi in ids else " and no <eoi>"))
        if len(codes) != len(span):
            first = next(i for i in span if i < self.image_offset)
            errors.append(f"image span holds {len(span) - len(codes)} non-image ids (first: {self.token_name(first)})")
        if errors:
            return None, rest, errors
        if self.eoi not in ids:
            notes.append("no <eoi> after the image")
        return np.asarray(codes, dtype=np.int64).reshape(self.grid), rest, []

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = int(ids[(ids < 0) | (ids >= self.size)][0])
            raise ValueError(f"id {bad} is outside the vocabulary of {self.size} ids (text {self.text_vocab_size}, "
                             f"{len(SPECIAL_TOKENS)} special, {self.codebook_size} image): not a sequence of this layout")

    # --- the layout, written down -------------------------------------------------------------
    def to_dict(self) -> dict:
        """The explicit layout (the export's layout.json)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "size": self.size,
            "text_vocab_size": self.text_vocab_size,
            "text_ids": [0, self.text_vocab_size - 1],
            "text_tokenizer_id": self.text_tokenizer_id,
            "max_text_tokens": self.max_text_tokens,
            "special_tokens": self.special_tokens(),
            "image_offset": self.image_offset,
            "image_ids": [self.image_offset, self.size - 1],
            "image_token": IMAGE_TOKEN.format("{code}") + " = id image_offset + code",
            "codebook_size": self.codebook_size,
            "grid": list(self.grid),
            "image_span": self.image_span,
            "image_tokenizer_id": self.image_tokenizer_id,
            "sequences": dict(SEQUENCE_LAYOUTS),
            "empty_caption": "zero text ids (a null caption too)",
            "truncation": "captions keep their first max_text_tokens text ids",
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "layout") -> Vocabulary:
        """Read to_dict()'s output back; refuses another format, a newer version, or ids that do not
        match this version's layout."""
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r}")
        if int(d.get("version", 0)) > VERSION:
            raise ValueError(f"{where}: layout version {d['version']} is newer than this vqtok reads ({VERSION}); "
                             f"upgrade vqtok")
        try:
            vocab = cls(int(d["text_vocab_size"]), str(d["text_tokenizer_id"]), int(d["codebook_size"]),
                        tuple(d["grid"]), str(d["image_tokenizer_id"]), int(d["max_text_tokens"]))
        except KeyError as e:
            raise ValueError(f"{where}: no {e.args[0]!r}; not a complete vqtok layout") from None
        written = {"special_tokens": d.get("special_tokens"), "image_offset": d.get("image_offset"), "size": d.get("size")}
        expected = {"special_tokens": vocab.special_tokens(), "image_offset": vocab.image_offset, "size": vocab.size}
        for key, value in written.items():
            if value is not None and value != expected[key]:
                raise ValueError(f"{where}: {key} {value} does not match layout version {VERSION} "
                                 f"(expected {expected[key]}); the file was edited or written by other code")
        return vocab

    def extend(self, text):
        """The text tokenizer's tokenizer.json (a tokenizers.Tokenizer) with the special and image
        tokens added as special AddedTokens at exactly this layout's ids. `text`: a TextTokenizer."""
        from tokenizers import AddedToken, Tokenizer

        if text.id != self.text_tokenizer_id or text.vocab_size != self.text_vocab_size:
            raise ValueError(f"text tokenizer {text.name} (id {text.id}, {text.vocab_size} ids) is not the one this "
                             f"layout was made for (id {self.text_tokenizer_id}, {self.text_vocab_size} ids)")
        tok = Tokenizer.from_str(text.hf().to_str())  # a copy: the text tokenizer itself is left as it was
        names = [*SPECIAL_TOKENS, *(IMAGE_TOKEN.format(c) for c in range(self.codebook_size))]
        held = tok.get_vocab(with_added_tokens=True)
        clash = [n for n in names if n in held]
        if clash:
            raise ValueError(f"text tokenizer {text.name} already has a token {clash[0]!r} (id {held[clash[0]]}); "
                             f"vqtok's layout needs that name for its own token: use another text tokenizer")
        tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
        for i, n in enumerate(names):
            got = tok.token_to_id(n)
            if got != self.text_vocab_size + i:
                raise ValueError(
                    f"text tokenizer {text.name}: {n} was given id {got}, the layout needs {self.text_vocab_size + i}; "
                    f"its ids are not contiguous (ids 0..{self.text_vocab_size - 1} are not all used), so new "
                    f"tokens cannot be appended at text_vocab_size")
        return tok

    @classmethod
    def from_tokenizer(cls, tok, grid, *, image_tokenizer_id: str = "", text_tokenizer_id: str = "",
                       max_text_tokens: int = 128) -> Vocabulary:
        """The layout of an extended tokenizer.json (`extend`'s output), found by name: <pad> at
        text_vocab_size, the specials after it, <img_0>.. <img_{K-1}> from image_offset. The grid
        is not in a tokenizer.json: give it (the image tokenizer's)."""
        pad = tok.token_to_id(SPECIAL_TOKENS[0])
        if pad is None:
            raise ValueError(f"the tokenizer has no {SPECIAL_TOKENS[0]} token: not a vqtok export's tokenizer.json "
                             f"(EXPORT/tokenizer.json)")
        for i, n in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(n) != pad + i:
                raise ValueError(f"the tokenizer's {n} has id {tok.token_to_id(n)}, expected {pad + i} "
                                 f"({SPECIAL_TOKENS[0]} + {i}): not a vqtok layout")
        codes = sorted(int(m.group(1)) for name in tok.get_vocab(with_added_tokens=True)
                       if (m := _IMAGE_TOKEN_RE.fullmatch(name)))
        k = len(codes)
        if k == 0 or codes != list(range(k)):
            raise ValueError(f"the tokenizer's image tokens are not <img_0> .. <img_{{K-1}}> ({k} found)")
        offset = pad + len(SPECIAL_TOKENS)
        for c in range(k):
            if tok.token_to_id(IMAGE_TOKEN.format(c)) != offset + c:
                raise ValueError(f"the tokenizer's {IMAGE_TOKEN.format(c)} has id "
                                 f"{tok.token_to_id(IMAGE_TOKEN.format(c))}, expected {offset + c}")
        top = max(tok.get_vocab(with_added_tokens=True).values())
        if top != offset + k - 1:
            raise ValueError(f"the tokenizer has id {top} beyond its last image token ({offset + k - 1}): "
                             f"not a vqtok layout")
        return cls(pad, text_tokenizer_id, k, tuple(grid), image_tokenizer_id, max_text_tokens)

    def same_layout(self, other: Vocabulary) -> bool:
        """Do both put every id in the same place (tokenizer ids and caption length aside)?"""
        return (self.text_vocab_size, self.codebook_size, self.grid) == (other.text_vocab_size, other.codebook_size,
                                                                         other.grid)
