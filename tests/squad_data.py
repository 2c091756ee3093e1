"""Small SQuAD-format files written by the SQuAD tests (no assets beyond the MiniLM tokenizer)."""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("river city north house music river stone garden paper light castle market winter bridge forest island "
         "tower school engine harbor valley summer silver village mountain library station theater").split()


def synthetic_squad(path: Path, n_articles: int = 4, n_paragraphs: int = 3, n_questions: int = 4, seed: int = 0,
                    version_2: bool = False) -> Path:
    """Contexts of random words; each question names a word and the answer is the two words after it.

    With ``version_2`` every fourth question asks about a word absent from its context (``is_impossible``).
    """
    rng = random.Random(seed)
    data = []
    for a in range(n_articles):
        paras = []
        for p in range(n_paragraphs):
            words = [rng.choice(WORDS) + str(rng.randrange(10)) for _ in range(rng.randrange(30, 60))]
            context = " ".join(words) + "."
            qas = []
            for q in range(n_questions):
                qid = f"a{a}p{p}q{q}"
                if version_2 and q % 4 == 3:
                    qas.append({"id": qid, "question": "what follows nothing0 ?", "answers": [], "is_impossible": True})
                    continue
                i = rng.randrange(len(words) - 3)
                if words[i] in words[:i]:
                    continue
                text = f"{words[i + 1]} {words[i + 2]}"
                start = len(" ".join(words[:i + 1])) + 1
                assert context[start:start + len(text)] == text
                qa = {"id": qid, "question": f"what follows {words[i]} ?",
                      "answers": [{"text": text, "answer_start": start}]}
                if version_2:
                    qa["is_impossible"] = False
                qas.append(qa)
            paras.append({"context": context, "qas": qas})
        data.append({"title": f"article{a}", "paragraphs": paras})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "v2.0" if version_2 else "1.1", "data": data}))
    return path
