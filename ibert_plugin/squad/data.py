"""Reading and validating SQuAD v1.1 / v2.0 JSON (``data -> paragraphs -> qas -> answers{text, answer_start}``).

Every answer must be found at its ``answer_start``. Differences in whitespace only are accepted and resolved to the
span of the stripped answer text: the official v1.1 dev set has 15 answers whose text starts with a space while
``answer_start`` points at the first non-space character (SQuADShifts has the same pattern). Anything else -- bad
JSON, a missing field, an offset whose text does not match -- raises :class:`SquadError` naming the file and the
question id, which the command-line tools print as one ``error:`` line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple


class SquadError(ValueError):
    """Malformed SQuAD input; the message is one line naming the file and the offending question."""


@dataclass
class Example:
    """One question over one context.

    Attributes:
        qid: the question id (key of the predictions JSON).
        question, context: raw strings (offsets index ``context``).
        answers: gold ``(text, char_start, char_end)`` spans, ``context[start:end]`` equal to the stripped text;
            the raw texts are kept in ``answer_texts`` for the official metrics.
        is_impossible: v2.0 unanswerable question (no answers).
    """

    qid: str
    question: str
    context: str
    answers: List[Tuple[str, int, int]] = field(default_factory=list)
    answer_texts: List[str] = field(default_factory=list)
    is_impossible: bool = False
    title: str = ""


def locate_answer(context: str, text: str, start: int) -> Optional[Tuple[int, int]]:
    """Character span ``[s, e)`` of ``text`` at ``start`` in ``context``, allowing whitespace-only differences.

    Accepted: the exact text at ``start``; or the text stripped of surrounding whitespace at ``start`` or at
    ``start`` shifted by the text's leading whitespace. Returns None when none matches.
    """
    core = text.strip()
    if not core or start < 0:
        return None
    lead = len(text) - len(text.lstrip())
    for s in (start + lead, start):
        if context[s:s + len(core)] == core:
            return s, s + len(core)
    return None


def load_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SquadError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise SquadError(f"{path}: not valid JSON ({e})") from None


def read_squad(path, version_2: bool = False) -> List[Example]:
    """Read a SQuAD JSON file into :class:`Example` rows (document order).

    Args:
        path: the JSON file.
        version_2: accept ``is_impossible`` questions (v2.0); without it an unanswerable question is an error.

    Raises:
        SquadError: malformed structure, duplicate ids, or an answer that is not at its offset.
    """
    path = Path(path)
    doc = load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise SquadError(f"{path}: expected a JSON object with a 'data' list (SQuAD format)")
    out: List[Example] = []
    seen = set()
    for ai, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise SquadError(f"{path}: data[{ai}] has no 'paragraphs' list")
        title = str(article.get("title", ""))
        for pi, para in enumerate(paragraphs):
            where = f"{path}: data[{ai}].paragraphs[{pi}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) \
                    or not isinstance(para.get("qas"), list):
                raise SquadError(f"{where}: expected 'context' (string) and 'qas' (list)")
            context = para["context"]
            for qa in para["qas"]:
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or "id" not in qa:
                    raise SquadError(f"{where}: a question lacks 'id' or 'question'")
                qid = str(qa["id"])
                if qid in seen:
                    raise SquadError(f"{where}: duplicate question id {qid}")
                seen.add(qid)
                impossible = bool(qa.get("is_impossible", False))
                if impossible and not version_2:
                    raise SquadError(f"{where}: question {qid} is_impossible but --version_2_with_negative is off")
                answers = qa.get("answers", [])
                if not isinstance(answers, list):
                    raise SquadError(f"{where}: question {qid}: 'answers' is not a list")
                if not impossible and not answers:
                    raise SquadError(f"{where}: question {qid} has no answers and is not marked is_impossible")
                ex = Example(qid, qa["question"], context, is_impossible=impossible, title=title)
                for a in ([] if impossible else answers):
                    try:
                        text, start = a["text"], int(a["answer_start"])
                    except (KeyError, TypeError, ValueError):
                        raise SquadError(f"{where}: question {qid}: an answer lacks 'text'/'answer_start'") from None
                    span = locate_answer(context, text, start)
                    if span is None:
                        found = context[start:start + len(text)]
                        raise SquadError(f"{where}: question {qid}: answer {text!r} not at answer_start {start} "
                                         f"(context there: {found!r})")
                    ex.answers.append((context[span[0]:span[1]], span[0], span[1]))
                    ex.answer_texts.append(text)
                out.append(ex)
    if not out:
        raise SquadError(f"{path}: no questions")
    return out
