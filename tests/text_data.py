"""A generated, labelled text corpus (five topics with synonyms, shared generic words, cross-topic
distractors and typos) for the text tests, so no third-party text is committed.
"""

from __future__ import annotations

import random

import numpy as np

# Vocabulary tables, kept one synonym group per entry on few lines for reading.
# fmt: off
TOPICS: dict[str, dict[str, list[list[str]]]] = {
    "sports": {
        "agent": [["striker", "forward"], ["goalkeeper", "keeper"], ["coach", "manager", "trainer"],
                  ["referee", "umpire"], ["captain", "skipper"], ["midfielder"], ["sprinter", "runner"]],
        "thing": [["match", "game", "fixture"], ["goal", "score"], ["tournament", "championship", "cup"],
                  ["stadium", "arena"], ["penalty", "free kick"], ["league", "division"], ["season"],
                  ["medal", "trophy"], ["team", "squad", "side"]],
        "action": [["scored", "netted"], ["defended", "blocked"], ["won", "clinched"], ["trained", "practised"],
                   ["lost", "conceded"], ["sprinted", "dashed"]],
        "quality": [["athletic", "fit"], ["defensive"], ["unbeaten", "undefeated"], ["fast", "quick", "speedy"]],
    },
    "cooking": {
        "agent": [["chef", "cook"], ["baker"], ["waiter", "server"], ["sommelier"], ["butcher"], ["diner", "guest"]],
        "thing": [["recipe", "dish"], ["oven", "stove"], ["sauce", "gravy"], ["garlic", "onion", "shallot"],
                  ["dough", "pastry", "batter"], ["soup", "broth", "stew"], ["pan", "skillet", "wok"],
                  ["flavour", "taste", "seasoning"], ["kitchen", "restaurant", "bistro"], ["dessert", "cake", "pie"]],
        "action": [["baked", "roasted"], ["stirred", "whisked"], ["seasoned", "salted"], ["simmered", "boiled"],
                   ["chopped", "diced", "sliced"], ["tasted", "sampled"]],
        "quality": [["delicious", "tasty", "savory"], ["crispy", "crunchy"], ["spicy", "hot"], ["tender", "juicy"]],
    },
    "finance": {
        "agent": [["investor", "shareholder"], ["banker", "lender"], ["analyst", "economist"], ["trader", "broker"],
                  ["accountant", "auditor"], ["regulator"]],
        "thing": [["stock", "share", "equity"], ["bond", "treasury"], ["dividend", "payout"], ["interest", "rate"],
                  ["portfolio", "fund"], ["inflation", "prices"], ["loan", "mortgage", "credit"],
                  ["profit", "earnings", "revenue"], ["market", "exchange"], ["budget", "deficit"]],
        "action": [["invested", "bought"], ["sold", "dumped"], ["lent", "borrowed"], ["rallied", "surged", "climbed"],
                   ["slumped", "plunged", "fell"], ["audited", "reviewed"]],
        "quality": [["bullish", "optimistic"], ["bearish", "cautious"], ["volatile", "turbulent"],
                    ["fiscal", "monetary"]],
    },
    "technology": {
        "agent": [["engineer", "developer", "programmer"], ["hacker"], ["startup", "company"], ["designer"],
                  ["administrator", "sysadmin"], ["researcher", "scientist"]],
        "thing": [["software", "application", "app"], ["server", "cluster"], ["database", "datastore"],
                  ["algorithm", "model"], ["laptop", "computer", "pc"], ["network", "internet"],
                  ["chip", "processor", "cpu"], ["code", "program"], ["bug", "glitch", "defect"],
                  ["cloud", "datacenter"]],
        "action": [["deployed", "shipped", "released"], ["compiled", "built"], ["debugged", "fixed", "patched"],
                   ["encrypted", "secured"], ["crashed", "failed"], ["upgraded", "updated"]],
        "quality": [["digital", "online"], ["wireless", "mobile"], ["scalable", "distributed"],
                    ["open source", "free"]],
    },
    "health": {
        "agent": [["doctor", "physician"], ["nurse"], ["patient"], ["surgeon"], ["pharmacist", "chemist"],
                  ["therapist", "counsellor"]],
        "thing": [["vaccine", "shot", "jab"], ["hospital", "clinic", "ward"], ["symptom", "sign"],
                  ["fever", "temperature"], ["medicine", "drug", "medication"], ["surgery", "operation"],
                  ["diet", "nutrition"], ["infection", "virus", "disease"], ["blood pressure", "cholesterol"],
                  ["diagnosis", "prognosis"]],
        "action": [["diagnosed", "examined"], ["treated", "cured", "healed"], ["prescribed", "recommended"],
                   ["vaccinated", "immunised"], ["recovered", "improved"], ["operated", "transplanted"]],
        "quality": [["chronic", "persistent"], ["acute", "severe"], ["clinical", "medical"], ["healthy", "fit"]],
    },
}
LABELS = list(TOPICS)
# Shared by every topic, so exact-word overlap alone is an imperfect signal.
GENERIC_NOUNS = ["plan", "report", "week", "team", "result", "city", "crowd", "record", "change", "problem",
                 "office", "group", "family", "morning", "evening", "news", "story", "year", "line", "board"]
GENERIC_ADJS = ["new", "big", "small", "important", "recent", "major", "local", "strong", "long", "early"]
FILLERS = ["yesterday", "on monday", "last night", "this week", "according to reports", "in the end",
           "once again", "for the first time", "after a long delay", "as expected", "surprisingly",
           "despite the weather", "in the city", "near the station", "before noon", "late on friday"]
TEMPLATES = [
    "the {q} {a} {v} the {t} {f}",
    "{f} a {g_adj} {a} {v} a {q} {t}",
    "{a}s say the {t} was {q} and the {g_noun} {v} {f}",
    "why the {a} {v} the {t}: a {g_adj} {g_noun} about {t2}",
    "{f}, the {t} and the {t2} were {q}",
    "our {g_noun} {v} {t} with the {a} {f}",
    "{q} {t}! the {a} {v} it {f}",
    "{a} {v} {t2} while the {g_noun} watched {f}",
    "is the {t} {q}? the {a} thinks the {g_noun} {v} {t2}",
    "{f} the {g_adj} {t} {v} as the {a} and {a2} met",
]
# fmt: on


def _word(rng: random.Random, topic: str, slot: str) -> str:
    synonyms = rng.choice(TOPICS[topic][slot])
    # Later synonyms are rarer, so placing them takes context rather than frequency.
    return rng.choices(synonyms, [1.0 / (i + 1) ** 1.5 for i in range(len(synonyms))])[0]


def topic_sentence(rng: random.Random, topic: str, noise: float = 0.25) -> str:
    def slot(name: str) -> str:
        source = rng.choice([t for t in LABELS if t != topic]) if rng.random() < noise else topic
        return _word(rng, source, name)

    return rng.choice(TEMPLATES).format(
        a=slot("agent"),
        a2=slot("agent"),
        t=slot("thing"),
        t2=slot("thing"),
        v=slot("action"),
        q=slot("quality"),
        f=rng.choice(FILLERS),
        g_adj=rng.choice(GENERIC_ADJS),
        g_noun=rng.choice(GENERIC_NOUNS),
    )


def _typo(rng: random.Random, word: str) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def make_corpus(n: int = 1500, seed: int = 7) -> tuple[list[str], np.ndarray]:
    """``n`` texts of 1-3 sentences, labels balanced over the topics."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % len(LABELS)
        sentences = [topic_sentence(rng, LABELS[label]) for _ in range(rng.choice([1, 1, 2, 3]))]
        words = [_typo(rng, w) if rng.random() < 0.05 else w for w in " . ".join(sentences).split()]
        text = " ".join(words).replace(" .", ".")
        texts.append(text[0].upper() + text[1:] + ".")
        labels.append(label)
    order = rng.sample(range(n), n)
    return [texts[i] for i in order], np.asarray([labels[i] for i in order])


def knn_label_agreement(vectors: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Share of each item's k nearest neighbours (cosine, itself excluded) that carry its label."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argpartition(-similarity, k, axis=1)[:, :k]
    return float((labels[neighbours] == labels[:, None]).mean())


def long_text(rng_seed: int = 3) -> str:
    """Starts with one cooking sentence, then goes on about finance for a long time."""
    rng = random.Random(rng_seed)
    opening = topic_sentence(rng, "cooking", noise=0.0)
    rest = " . ".join(topic_sentence(rng, "finance", noise=0.0) for _ in range(12))
    return f"{opening} . {rest}."
