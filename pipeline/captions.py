"""Captions and source metadata: what a token dataset keeps of the text beside each image.

Where they come from (pipeline/sources.py reads them raw, this module turns them into columns):

    WebDataset shards   KEY.txt (else KEY.caption) is the caption; KEY.json the metadata
    Parquet files       the first column named caption, text or txt (any case: LAION's TEXT), or
                        the one named by --caption-column; metadata: the columns --keep-columns names
    image folders       NAME.txt beside NAME.jpg is the caption; NAME.json the metadata
    IDX files           X-captions.txt[.gz] beside X-images-idx3-ubyte[.gz]: line i is image i's
                        caption (so a caption cannot hold a newline); no metadata

The caption is the source's text exactly, with only these changes (none of which counts as a
repair): a leading UTF-8 byte-order mark and one trailing line end ("\\n" or "\\r\\n", what editors
and `echo` leave) are removed, and "\\r\\n" line ends inside are written "\\n". A caption that is not
usable as it is never costs its image: the row is written, and

    not UTF-8                        decoded with U+FFFD for the bad bytes          repaired
    control characters               (other than tab and newline) each -> a space    repaired
    longer than --max-caption-bytes  cut there, at a character boundary             repaired
    a non-string Parquet value       numbers and booleans as text, lists and        repaired
                                     structs as JSON text
    empty (or only whitespace)       null                                            unusable
    none at all                      null                                            missing

Repaired and unusable captions are recorded in the dataset's _errors/ (kind "caption"; never
counted as failed images) and counted in the summary; missing ones are only counted.

Metadata (`meta` column): a JSON object (text) of the fields --keep-columns names, taken from the
source's JSON (KEY.json, NAME.json) or its Parquet columns; `*` keeps every field (Parquet: every
column but the image); null where nothing was kept. A .json that is not a JSON object gives null,
recorded like an unusable caption (kind "meta").
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

MAX_CAPTION_BYTES = 4096  # default cut; LAION/COYO/CC12M alt-texts are well under 1 KiB
CAPTION_MEMBERS = ("txt", "caption")  # WebDataset member extensions holding the caption, in order
META_MEMBER = "json"
PARQUET_CAPTION_COLUMNS = ("caption", "text", "txt")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but tab (\x09) and newline (\x0a)


@dataclass(frozen=True)
class TextFields:
    """What a tokenize run keeps of the text beside each image (recorded in the dataset's metadata:
    a re-run into the same dataset must keep the same)."""

    caption_column: str | None = None  # Parquet: this column holds captions (default: caption/text/txt)
    keep_columns: tuple[str, ...] = ()  # metadata fields to keep in `meta`; ("*",) keeps all
    max_caption_bytes: int = MAX_CAPTION_BYTES

    def to_dict(self) -> dict:
        return {"caption_column": self.caption_column, "keep_columns": list(self.keep_columns),
                "max_caption_bytes": self.max_caption_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "TextFields":
        return cls(d.get("caption_column"), tuple(d.get("keep_columns", ())), d.get("max_caption_bytes", MAX_CAPTION_BYTES))

    @property
    def keep_all(self) -> bool:
        return "*" in self.keep_columns


@dataclass
class CaptionNote:
    """A caption (or metadata) that was repaired (kept, changed) or unusable (null). Recorded in
    _errors/ with kind "caption"; the image's row is written either way."""

    key: str
    unit: str
    reason: str
    kept: bool  # True: repaired and kept; False: null
    column: str = "caption"  # or "meta"

    def record(self) -> dict:
        """Its _errors/ line: kind "caption" (or "meta"), and what was written ("repaired" or "null")."""
        return {"key": self.key, "unit": self.unit, "reason": self.reason, "kind": self.column,
                "written": "repaired" if self.kept else "null"}


def clean_caption(raw, max_bytes: int = MAX_CAPTION_BYTES) -> tuple[str | None, str | None, bool]:
    """A raw caption (bytes from a member or sidecar, a Parquet value, or None) -> (caption or None,
    what was wrong or None, whether it is kept). See the module docstring for the rules."""
    if raw is None:
        return None, None, False  # missing: only counted
    problems = []
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            problems.append(f"not UTF-8 ({text.count(chr(0xFFFD))} bad bytes written as U+FFFD)")
    elif isinstance(raw, str):
        text = raw
    elif isinstance(raw, (bool, int, float)):
        text = str(raw)
        problems.append(f"a {type(raw).__name__} value, not text: written as text")
    else:
        text = json.dumps(raw, ensure_ascii=False, default=_json_default)
        problems.append(f"a {type(raw).__name__} value, not text: written as JSON")
    text = text.removeprefix("\ufeff")
    text = text.removesuffix("\n")
    text = text.removesuffix("\r")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        return None, "empty caption" if not problems else "; ".join(problems + ["empty"]), False
    controls = len(_CONTROL.findall(text))
    if controls:
        text = _CONTROL.sub(" ", text)
        problems.append(f"{controls} control character{'s' if controls > 1 else ''} replaced by spaces")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")  # whole characters only
        problems.append(f"{size:,} bytes, cut to {len(text.encode('utf-8')):,} (--max-caption-bytes {max_bytes})")
    return text, ("; ".join(problems) or None), True


def clean_meta(raw, fields: TextFields) -> tuple[str | None, str | None]:
    """Raw metadata (bytes of a KEY.json member or sidecar, or a dict of Parquet values) -> (the
    kept fields as JSON text or None, what was wrong or None)."""
    if raw is None or not fields.keep_columns:
        return None, None
    if isinstance(raw, dict):
        obj = raw
    else:
        try:
            obj = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return None, f"metadata .json is not valid JSON ({type(e).__name__})"
        if not isinstance(obj, dict):
            return None, f"metadata .json holds a {type(obj).__name__}, not a JSON object"
    kept = obj if fields.keep_all else {k: obj[k] for k in fields.keep_columns if k in obj}
    if not kept:
        return None, None
    return json.dumps(kept, ensure_ascii=False, default=_json_default, separators=(",", ":")), None


def _json_default(v):
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode()
    return str(v)  # datetimes, decimals
