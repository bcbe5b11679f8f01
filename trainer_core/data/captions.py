"""Captions for a training image, with SimpleTuner's ``caption_strategy`` meanings.

* ``textfile``: the ``.txt`` with the image's stem next to it. Every non-empty line is one
  caption; all lines are kept as alternatives and the trainer picks one per step, which is how
  SimpleTuner lets a dataset carry several phrasings of the same picture.
* ``filename``: the file stem with ``_`` and ``-`` read as spaces.
* ``instanceprompt``: ``instance_prompt`` for every image (DreamBooth style).

``prepend_instance_prompt`` puts ``instance_prompt`` (a trigger word, usually) in front of each
textfile/filename caption. A problem (missing or empty text file, nothing usable in a file
name) raises :class:`CaptionProblem`, which discovery collects with every other problem so the
user sees them all at once.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..spec import DatasetSpec

_SEPARATORS = re.compile(r"[_\-\s]+")


class CaptionProblem(ValueError):
    """The captions of one image cannot be read; the message names the files involved."""


def caption_path(image: Path) -> Path:
    """Where ``caption_strategy: textfile`` looks for the captions of ``image``."""
    return image.with_suffix(".txt")


def read_caption_file(path: Path, image: Path) -> tuple[str, ...]:
    """Non-empty, stripped lines of ``path``; a missing, unreadable or blank file is a problem."""
    try:
        # utf-8-sig: Windows editors like to start files with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CaptionProblem(f"missing caption file: {image} has no {path}") from None
    except UnicodeDecodeError as e:
        raise CaptionProblem(f"caption file {path} (for {image}) is not UTF-8 text: {e.reason}") from None
    except OSError as e:
        raise CaptionProblem(f"caption file {path} (for {image}) cannot be read: {e.strerror or e}") from None
    lines = tuple(line.strip() for line in text.splitlines())
    captions = tuple(line for line in lines if line)
    if not captions:
        raise CaptionProblem(f"empty caption file: {path} (for {image}) holds no caption")
    return captions


def caption_from_filename(image: Path) -> str:
    """``a_red-fox  01.png`` -> ``a red fox 01``."""
    return _SEPARATORS.sub(" ", image.stem).strip()


def captions_for(image: Path, ds: DatasetSpec) -> tuple[str, ...]:
    """All caption alternatives of ``image`` under the dataset's strategy.

    Raises :class:`CaptionProblem` naming the image (and the expected text file) when there is
    no usable caption.
    """
    strategy = ds.caption_strategy
    if strategy == "instanceprompt":
        prompt = (ds.instance_prompt or "").strip()
        if not prompt:
            raise CaptionProblem(
                f"dataset {ds.id!r} uses caption_strategy 'instanceprompt' but instance_prompt is empty"
            )
        return (prompt,)
    if strategy == "textfile":
        captions = read_caption_file(caption_path(image), image)
    elif strategy == "filename":
        caption = caption_from_filename(image)
        if not caption:
            raise CaptionProblem(f"caption_strategy 'filename' gives an empty caption for {image}")
        captions = (caption,)
    else:  # pragma: no cover - DatasetSpec's Literal rejects anything else
        raise CaptionProblem(f"dataset {ds.id!r}: unknown caption_strategy {strategy!r}")
    if ds.prepend_instance_prompt:
        prefix = (ds.instance_prompt or "").strip()
        if prefix:
            captions = tuple(f"{prefix} {c}" for c in captions)
    return captions
