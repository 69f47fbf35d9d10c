#!/usr/bin/env python3
"""Generate a small, real *spoken* data set for a toy "GRPO for speech-aware LMs" study.

The paper this project imitates trains Granite Speech with GRPO on CoVoST2
(English speech -> German text) and on LibriSQA (spoken question answering).
This script builds a miniature stand-in for both, entirely offline:

* English sentences come from a small hand-written grammar (~20 nouns with
  German gender, colours/adjectives, numbers, ~10 verbs, places, adverbs,
  names and cities).
* Every sentence is rendered to speech with the espeak-ng synthesiser using
  many English voices/accents, random speed and pitch, then resampled to
  16 kHz mono with sox and stored as OGG Opus.
* The German reference is produced by *rules*, not word-for-word: gender and
  case (der/den/dem, ein/einen/eine), adjective endings (ein roter Ball,
  einen roten Ball, zwei rote Baelle), verb conjugation, plurals, irregular
  nouns, place phrases with the dative (im Garten, in der Kueche, zu Hause),
  verb-second inversion after a fronted adverb ("gestern sah der Mann den
  Hund") and verb-final subordinate clauses ("..., weil der Hund gross ist").

Tasks (one directory each, JSON Lines manifests):

* ``ast/``  speech translation English audio -> German text
* ``asr/``  transcription (the SAME utterances as ``ast``)
* ``sqa/``  a spoken 2-3 sentence passage + a text question -> answer sentence

The domain shift
----------------
A tiny model is first trained to convergence on the ``pretrain`` split (asr +
ast).  GRPO then runs on ``train`` and is evaluated on ``dev``/``test``.  If
those splits looked like ``pretrain`` the converged model would already be
near-perfect and RL would have nothing to do, so they are *shifted*:

* ``pretrain``: simple sentences (3-12 words): subject + verb + object with
  up to two adjectives, numbers with plurals and place phrases (a third of
  them are as long as the shifted sentences, so that a converged model knows
  long outputs and the shift is one of construction, not of length), "X is
  ADJ", "X has two dogs", an adverb at the END ("the man saw the dog
  yesterday"), and a share --bridge (15%) of short sentences built like the
  shifted ones: a fronted adverb or a because/when clause with plain noun
  phrases ("yesterday max saw the apple", "when paul is happy they need the
  cake").  Voices from set A.
* ``train``/``dev``/``test``: longer (7-14 words), differently built
  sentences: two adjectives, numbers with adjective + plural, FRONTED adverbs
  (German verb-second inversion), subordinate "because"/"when" clauses with
  full noun phrases (German verb-final order, and inversion when the clause
  comes first), combined with place phrases.  Voices A plus new voices B;
  ``test`` also uses voices C that occur nowhere else.

The vocabulary is shared: every word in train/dev/test (and in the spoken SQA
passages and answers) also occurs in ``pretrain`` (checked, and enforced by
adding pretrain sentences if needed).  Sentences are disjoint across splits.
There is no ``sqa/pretrain``: the model never sees SQA before fine-tuning.

Determinism: all text, prompt templates, voices, speeds and pitches are drawn
from one seeded ``random.Random`` in the main process, so the manifests are
byte-identical for a given ``--seed``.  Synthesis runs in a process pool.

Usage::

    python data/make_data.py                 # full size, seed 0
    python data/make_data.py --scale 0.05    # quick smoke run
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool

import numpy as np
import soundfile as sf

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

SAMPLE_RATE = 16000
# soundfile's compression_level for OGG Opus: 0 = biggest/best, 1 = smallest.
# 0.99 gives roughly 11 kbit/s speech, which keeps all audio under ~22 MB.
OPUS_COMPRESSION = 0.99

# Utterance counts at --scale 1.0.
SIZES = {
    "speech": {"pretrain": 3000, "train": 1000, "dev": 150, "test": 200},
    "sqa": {"train": 800, "dev": 100, "test": 150},
}

# espeak-ng voices ("language+variant").  A: pretrain and everywhere,
# B: new in train/dev/test, C: test only.  Voices that fail to synthesise
# on this machine are skipped (printed at start-up).
VOICES = {
    "A": ["en-us", "en-gb", "en-gb-x-rp+f2", "en-us+m3", "en-gb+f4",
          "en-us-nyc+m7"],
    "B": ["en-gb-scotland", "en-029+f1", "en-us+klatt2"],
    "C": ["en-gb-x-gbclan+m2", "en-gb-x-gbcwmd+f5", "en-029+klatt"],
}
# Probability of drawing from each voice group, per split.
VOICE_MIX = {
    "pretrain": {"A": 1.0},
    "train": {"A": 0.6, "B": 0.4},
    "dev": {"A": 0.6, "B": 0.4},
    "test": {"A": 0.4, "B": 0.3, "C": 0.3},
}
SPEED_RANGE = (140, 190)   # espeak-ng -s, words per minute
PITCH_RANGE = (35, 65)     # espeak-ng -p, 0..99

PROMPTS = {
    "ast": ["<|audio|> listen to the speech and translate it into German.",
            "<|audio|> translate the speech into German.",
            "Listen to the audio <|audio|> and translate it into German."],
    "asr": ["<|audio|> can you transcribe the speech into a written format?",
            "<|audio|> write down what is said in the audio.",
            "Listen to the audio <|audio|> and transcribe it."],
    "sqa": ["Listen to the audio <|audio|> and answer the following question: {question}",
            "<|audio|> answer the question about the audio: {question}"],
}

# ---------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------

# English singular, English plural, German gender, German singular, German
# plural, class.  "weak" masculine nouns take -n outside the nominative.
NOUNS = {
    # people
    "man": ("men", "m", "Mann", "Männer", "person"),
    "woman": ("women", "f", "Frau", "Frauen", "person"),
    "child": ("children", "n", "Kind", "Kinder", "person"),
    "girl": ("girls", "n", "Mädchen", "Mädchen", "person"),
    "boy": ("boys", "m", "Junge", "Jungen", "person"),       # weak noun
    "teacher": ("teachers", "m", "Lehrer", "Lehrer", "person"),
    # animals
    "dog": ("dogs", "m", "Hund", "Hunde", "animal"),
    "cat": ("cats", "f", "Katze", "Katzen", "animal"),
    "bird": ("birds", "m", "Vogel", "Vögel", "animal"),
    "horse": ("horses", "n", "Pferd", "Pferde", "animal"),
    "mouse": ("mice", "f", "Maus", "Mäuse", "animal"),
    "duck": ("ducks", "f", "Ente", "Enten", "animal"),
    # things
    "ball": ("balls", "m", "Ball", "Bälle", "thing"),
    "car": ("cars", "n", "Auto", "Autos", "thing"),
    "book": ("books", "n", "Buch", "Bücher", "thing"),
    "apple": ("apples", "m", "Apfel", "Äpfel", "thing"),
    "cup": ("cups", "f", "Tasse", "Tassen", "thing"),
    "hat": ("hats", "m", "Hut", "Hüte", "thing"),
    "chair": ("chairs", "m", "Stuhl", "Stühle", "thing"),
    "flower": ("flowers", "f", "Blume", "Blumen", "thing"),
    "cake": ("cakes", "m", "Kuchen", "Kuchen", "thing"),
    "egg": ("eggs", "n", "Ei", "Eier", "thing"),
}
WEAK_NOUNS = {"boy": "Jungen"}          # den Jungen, dem Jungen
FOOD = ["apple", "cake", "egg"]
ANIMATE = [n for n, v in NOUNS.items() if v[4] in ("person", "animal")]
THINGS = [n for n, v in NOUNS.items() if v[4] == "thing"]
ANIMALS = [n for n, v in NOUNS.items() if v[4] == "animal"]
PEOPLE = [n for n, v in NOUNS.items() if v[4] == "person"]

# Attributive adjectives by category; two adjectives follow English order
# size -> age -> colour ("the small old red car").
ADJ_SIZE = {"big": "groß", "small": "klein"}
ADJ_AGE = {"old": "alt", "new": "neu"}
ADJ_COLOUR = {"red": "rot", "blue": "blau", "green": "grün", "yellow": "gelb",
              "black": "schwarz", "white": "weiß"}
ADJ_ALL = {**ADJ_SIZE, **ADJ_AGE, **ADJ_COLOUR}
# Predicative adjectives for "X is ADJ" (uninflected in German).
ADJ_PRED_ANIMATE = {"happy": "glücklich", "tired": "müde", "big": "groß",
                    "small": "klein", "old": "alt"}
ADJ_PRED_THING = {"big": "groß", "small": "klein", "old": "alt", "new": "neu",
                  **ADJ_COLOUR}

NUMBERS = {"two": "zwei", "three": "drei", "four": "vier", "five": "fünf",
           "six": "sechs"}
NUMBERS_SQA = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

# Verbs: English 3sg, plural, past; German 3sg, 3pl, past 3sg, past 3pl;
# allowed objects (see OBJECTS) and subjects (see SUBJECTS).
VERBS = {
    "see": ("sees", "see", "saw", "sieht", "sehen", "sah", "sahen", "any"),
    "have": ("has", "have", "had", "hat", "haben", "hatte", "hatten", "nonperson"),
    "like": ("likes", "like", "liked", "mag", "mögen", "mochte", "mochten", "any"),
    "want": ("wants", "want", "wanted", "will", "wollen", "wollte", "wollten", "thing"),
    "find": ("finds", "find", "found", "findet", "finden", "fand", "fanden", "any"),
    "buy": ("buys", "buy", "bought", "kauft", "kaufen", "kaufte", "kauften", "thing"),
    "carry": ("carries", "carry", "carried", "trägt", "tragen", "trug", "trugen", "thing"),
    "eat": ("eats", "eat", "ate", "isst", "essen", "aß", "aßen", "food"),
    "need": ("needs", "need", "needed", "braucht", "brauchen", "brauchte", "brauchten", "thing"),
}
BE = {"sg": ("is", "ist"), "pl": ("are", "sind"),
      "sg_past": ("was", "war"), "pl_past": ("were", "waren")}
LIVE = ("lives", "live", "lived", "wohnt", "wohnen", "wohnte", "wohnten")

# Place phrases: English -> German (the preposition governs the dative).
PLACES = {
    "in the garden": "im Garten",
    "in the park": "im Park",
    "in the kitchen": "in der Küche",
    "in the forest": "im Wald",
    "at school": "in der Schule",
    "at home": "zu Hause",
    "on the table": "auf dem Tisch",
    "on the street": "auf der Straße",
}
NAMES = {"anna": "Anna", "tom": "Tom", "lisa": "Lisa", "paul": "Paul",
         "emma": "Emma", "max": "Max"}
CITIES = {"berlin": "Berlin", "london": "London", "vienna": "Wien",
          "munich": "München"}
# adverb -> (German, tense it forces)
ADVERBS = {"yesterday": ("gestern", "past"), "today": ("heute", "present"),
           "often": ("oft", "present")}
CONJ = {"because": "weil", "when": "wenn"}

# German article / adjective-ending tables, indexed [case][gender].
DEF_ART = {"nom": {"m": "der", "f": "die", "n": "das", "pl": "die"},
           "acc": {"m": "den", "f": "die", "n": "das", "pl": "die"},
           "dat": {"m": "dem", "f": "der", "n": "dem", "pl": "den"}}
INDEF_ART = {"nom": {"m": "ein", "f": "eine", "n": "ein"},
             "acc": {"m": "einen", "f": "eine", "n": "ein"},
             "dat": {"m": "einem", "f": "einer", "n": "einem"}}
# Weak endings (after der/die/das), mixed (after ein), strong (no article).
ADJ_END = {
    "def": {"nom": {"m": "e", "f": "e", "n": "e", "pl": "en"},
            "acc": {"m": "en", "f": "e", "n": "e", "pl": "en"}},
    "indef": {"nom": {"m": "er", "f": "e", "n": "es"},
              "acc": {"m": "en", "f": "e", "n": "es"}},
    "num": {"nom": {"pl": "e"}, "acc": {"pl": "e"}},
}

# ---------------------------------------------------------------------------
# Noun phrases
# ---------------------------------------------------------------------------


class NP:
    """A noun phrase that can be rendered in English and in German (any case).

    kind: "def" (the), "indef" (a), "num" (two..six + plural), "defpl"
    (the + plural), "name" (anna), "they".
    """

    def __init__(self, kind, noun=None, adjs=(), num=None, name=None):
        self.kind, self.noun, self.adjs = kind, noun, list(adjs)
        self.num, self.name = num, name

    @property
    def plural(self):
        return self.kind in ("num", "defpl", "they")

    def english(self):
        if self.kind == "name":
            return self.name
        if self.kind == "they":
            return "they"
        noun = NOUNS[self.noun][0] if self.plural else self.noun
        words = self.adjs + [noun]
        if self.kind == "def" or self.kind == "defpl":
            det = "the"
        elif self.kind == "indef":
            det = "an" if words[0][0] in "aeiou" else "a"
        else:
            det = self.num
        return " ".join([det] + words)

    def german(self, case):
        if self.kind == "name":
            return NAMES[self.name]
        if self.kind == "they":
            return "sie"
        _, gender, sg, pl, _ = NOUNS[self.noun]
        g = "pl" if self.plural else gender
        if self.kind in ("def", "defpl"):
            det, ending_table = DEF_ART[case][g], "def"
        elif self.kind == "indef":
            det, ending_table = INDEF_ART[case][g], "indef"
        else:
            det, ending_table = NUMBERS[self.num], "num"
        adjs = [ADJ_ALL[a] + ADJ_END[ending_table][case][g] for a in self.adjs]
        # Adjective stems ending in -e (müde) never occur attributively here.
        if self.plural:
            noun = pl
        elif case != "nom" and self.noun in WEAK_NOUNS:
            noun = WEAK_NOUNS[self.noun]
        else:
            noun = sg
        return " ".join([det] + adjs + [noun])


# Which adjectives make sense for which nouns (no "yellow women").
ADJ_FOR_CLASS = {
    "person": [ADJ_SIZE, ADJ_AGE],
    "animal": [ADJ_SIZE, ADJ_AGE, {"black": "schwarz", "white": "weiß"}],
    "thing": [ADJ_SIZE, ADJ_AGE, ADJ_COLOUR],
}


def pick_adjs(rng, noun, n):
    """n (0-2) attributive adjectives from different categories, English order."""
    cats = ADJ_FOR_CLASS[NOUNS[noun][4]]
    chosen = sorted(rng.sample(range(len(cats)), min(n, len(cats))))
    return [rng.choice(sorted(cats[c])) for c in chosen]


def make_np(rng, pool, n_adj, kinds):
    kind = rng.choice(kinds)
    if kind == "name":
        return NP("name", name=rng.choice(sorted(NAMES)))
    if kind == "they":
        return NP("they")
    noun = rng.choice(pool)
    num = rng.choice(sorted(NUMBERS)) if kind == "num" else None
    return NP(kind, noun, pick_adjs(rng, noun, n_adj), num)


def object_pool(verb):
    restriction = VERBS[verb][7]
    return {"any": ANIMATE + THINGS, "nonperson": ANIMALS + THINGS,
            "thing": THINGS, "food": FOOD}[restriction]


PEOPLE_ONLY_VERBS = {"buy", "carry", "want", "need"}   # a bird does not buy chairs


def subject_pool(verb):
    return PEOPLE if verb in PEOPLE_ONLY_VERBS else ANIMATE


# ---------------------------------------------------------------------------
# Clauses: a clause is rendered in English and in German in one of three
# word orders: "main" (verb second), "inverted" (something fronted, verb
# second, subject after the verb) and "sub" (verb last).
# ---------------------------------------------------------------------------


class Clause:
    """subject + verb (+ object | predicative adjective | place | city)."""

    def __init__(self, subj, verb, obj=None, pred=None, place=None,
                 tense="present", adverb=None, city=None):
        self.subj, self.verb, self.obj, self.pred = subj, verb, obj, pred
        self.place, self.tense, self.adverb, self.city = place, tense, adverb, city

    def _verb_forms(self):
        num = "pl" if self.subj.plural else "sg"
        past = self.tense == "past"
        if self.verb == "be":
            return BE[num + ("_past" if past else "")]
        forms = LIVE if self.verb == "live" else VERBS[self.verb]
        en = forms[2] if past else (forms[1] if num == "pl" else forms[0])
        de = forms[{("sg", False): 3, ("pl", False): 4,
                    ("sg", True): 5, ("pl", True): 6}[(num, past)]]
        return en, de

    def _rest(self):
        """English and German words after the verb (object/predicate/place)."""
        en, de = [], []
        if self.obj is not None:
            en.append(self.obj.english()); de.append(self.obj.german("acc"))
        if self.pred is not None:
            en.append(self.pred)
            table = ADJ_PRED_THING if self.subj.noun in THINGS else ADJ_PRED_ANIMATE
            de.append(table[self.pred])
        if self.city is not None:
            en.append("in " + self.city); de.append("in " + CITIES[self.city])
        if self.place is not None:
            en.append(self.place); de.append(PLACES[self.place])
        return en, de

    def english(self, front_adverb=False):
        v_en, _ = self._verb_forms()
        rest_en, _ = self._rest()
        words = [self.subj.english()]
        if self.adverb == "often":
            words += ["often", v_en] if not front_adverb else [v_en]
        else:
            words.append(v_en)
        words += rest_en
        if self.adverb in ("yesterday", "today") and not front_adverb:
            words.append(self.adverb)
        if front_adverb:
            words = [self.adverb] + words
        return " ".join(words)

    def german(self, order="main", front_adverb=False):
        _, v_de = self._verb_forms()
        _, rest_de = self._rest()
        subj = self.subj.german("nom")
        adv = [ADVERBS[self.adverb][0]] if self.adverb else []
        if order == "sub":                       # weil der Hund oft den Ball sieht
            words = [subj] + adv + rest_de + [v_de]
        elif front_adverb:                        # gestern sah der Hund den Ball
            words = adv + [v_de, subj] + rest_de
        elif order == "inverted":                 # (wenn ..., ) sieht der Hund den Ball
            words = [v_de, subj] + adv + rest_de
        else:                                     # der Hund sah gestern den Ball
            words = [subj, v_de] + adv + rest_de
        return " ".join(words)


def capitalise(s):
    return s[0].upper() + s[1:]


def random_transitive(rng, n_adj_subj, n_adj_obj, subj_kinds, obj_kinds,
                      place_p, tense="present"):
    verb = rng.choice(sorted(VERBS))
    subj = make_np(rng, subject_pool(verb), n_adj_subj, subj_kinds)
    obj = make_np(rng, object_pool(verb), n_adj_obj, obj_kinds)
    while obj.noun is not None and obj.noun == subj.noun:
        obj = make_np(rng, object_pool(verb), n_adj_obj, obj_kinds)
    place = rng.choice(sorted(PLACES)) if rng.random() < place_p else None
    return Clause(subj, verb, obj=obj, place=place, tense=tense)


def random_copula(rng, subj_kinds, n_adj=0, place_ok=True):
    """'the dog is happy' / 'the ball is red' / 'the cat is in the kitchen'."""
    subj = make_np(rng, ANIMATE + THINGS, n_adj, subj_kinds)
    if place_ok and rng.random() < 0.3:
        return Clause(subj, "be", place=rng.choice(sorted(PLACES)))
    is_thing = subj.noun in THINGS
    table = ADJ_PRED_THING if is_thing else ADJ_PRED_ANIMATE
    # no "the small dog is big": skip predicates from an adjective's category
    taken = [c for c in (ADJ_SIZE, ADJ_AGE, ADJ_COLOUR) if set(c) & set(subj.adjs)]
    pred = rng.choice(sorted(a for a in table if not any(a in c for c in taken)))
    return Clause(subj, "be", pred=pred)


# ---------------------------------------------------------------------------
# Sentence generators.  Each returns (english, german).
# ---------------------------------------------------------------------------

SIMPLE_SUBJ = ["def", "def", "indef", "defpl", "name", "they"]
SIMPLE_OBJ = ["def", "indef", "indef", "defpl"]


def subordinate(main, conj, sub, clause_first=False):
    """main + because/when + verb-final clause, or (when only) the clause first:
    "when the dog sees the cat the bird is happy" ->
    "Wenn der Hund die Katze sieht, ist der Vogel glücklich"."""
    if clause_first:
        en = f"when {sub.english()} {main.english()}"
        de = f"wenn {sub.german('sub')}, {main.german('inverted')}"
    else:
        en = f"{main.english()} {conj} {sub.english()}"
        de = f"{main.german()}, {CONJ[conj]} {sub.german('sub')}"
    return en, capitalise(de)


BRIDGE = 0.15   # share of pretrain sentences built like train's, but short (--bridge)


def bridge_sentence(rng):
    """The shifted constructions in short form (3-12 words): a fronted adverb,
    or a because/when clause, with plain noun phrases (at most one adjective,
    no numbers).  They keep the shift one of combination, length and voice
    rather than of never-heard word orders."""
    if rng.random() < 0.5:      # yesterday the dog saw a ball
        adverb = rng.choice(sorted(ADVERBS))
        n_adj = rng.choice([0, 0, 1])
        on_subj = rng.random() < 0.5
        c = random_transitive(rng, n_adj if on_subj else 0, 0 if on_subj else n_adj,
                              SIMPLE_SUBJ, SIMPLE_OBJ, 0.2, ADVERBS[adverb][1])
        c.adverb = adverb
        return c.english(front_adverb=True), capitalise(c.german(front_adverb=True))
    conj = rng.choice(sorted(CONJ))
    main = random_transitive(rng, 0, rng.choice([0, 1]), SIMPLE_SUBJ, SIMPLE_OBJ, 0.0)
    if rng.random() < 0.5:
        sub = random_copula(rng, ["def", "name"], 0, place_ok=False)
    else:
        sub = random_transitive(rng, 0, 0, ["def", "name"], ["def", "indef"], 0.0)
    return subordinate(main, conj, sub, clause_first=conj == "when" and rng.random() < 0.5)


def pretrain_sentence(rng):
    """Simple sentences, 3-12 words: plain word order, adverbs at the end,
    and a share BRIDGE of short sentences built like the shifted ones."""
    if rng.random() < BRIDGE:
        return bridge_sentence(rng)
    if rng.random() < 0.33:   # long but simple: two adjectives, number + plural, place
        c = random_transitive(rng, rich_np_adjs(rng), rich_np_adjs(rng),
                              RICH_SUBJ, RICH_OBJ, place_p=0.5)
        return c.english(), capitalise(c.german())
    r = rng.random()
    if r < 0.45:      # S V O (+ one adjective) (+ place)
        n_adj = rng.choice([0, 1])
        on_subj = rng.random() < 0.5
        c = random_transitive(rng, n_adj if on_subj else 0,
                              0 if on_subj else n_adj, SIMPLE_SUBJ, SIMPLE_OBJ,
                              place_p=0.3)
        return c.english(), capitalise(c.german())
    if r < 0.60:      # X is ADJ / X is in the garden
        c = random_copula(rng, ["def", "def", "defpl", "name"])
        return c.english(), capitalise(c.german())
    if r < 0.72:      # the man has two dogs  (number + plural, no adjective)
        c = random_transitive(rng, 0, 0, ["def", "name"], ["num"], place_p=0.0)
        return c.english(), capitalise(c.german())
    if r < 0.87:      # adverb at the end / "often" before the verb
        adverb = rng.choice(sorted(ADVERBS))
        tense = ADVERBS[adverb][1]
        c = random_transitive(rng, 0, 0, SIMPLE_SUBJ, SIMPLE_OBJ, 0.0, tense)
        c.adverb = adverb
        return c.english(), capitalise(c.german())
    if r < 0.94:      # anna lives in vienna
        subj = make_np(rng, ANIMATE, 0, ["name", "name", "def", "they"])
        c = Clause(subj, "live", city=rng.choice(sorted(CITIES)))
        return c.english(), capitalise(c.german())
    # rare, very short subordinate clause: anna is happy when tom is tired
    a, b = rng.sample(sorted(NAMES), 2)
    main = Clause(NP("name", name=a), "be", pred=rng.choice(sorted(ADJ_PRED_ANIMATE)))
    sub = Clause(NP("name", name=b), "be", pred=rng.choice(sorted(ADJ_PRED_ANIMATE)))
    conj = rng.choice(sorted(CONJ))
    en = f"{main.english()} {conj} {sub.english()}"
    de = f"{main.german()}, {CONJ[conj]} {sub.german('sub')}"
    return en, capitalise(de)


RICH_SUBJ = ["def", "def", "indef", "num", "name"]
RICH_OBJ = ["def", "indef", "num", "num"]


def rich_np_adjs(rng):
    return rng.choice([0, 1, 2, 2])


def shifted_sentence(rng):
    """Longer, differently built sentences for train/dev/test (7-14 words)."""
    r = rng.random()
    if r < 0.25:      # two adjectives and/or number + adjectives + plural, + place
        c = random_transitive(rng, rich_np_adjs(rng), rich_np_adjs(rng),
                              RICH_SUBJ, RICH_OBJ, place_p=0.5)
        return c.english(), capitalise(c.german())
    if r < 0.50:      # fronted adverb -> verb-second inversion
        adverb = rng.choice(sorted(ADVERBS))
        c = random_transitive(rng, rng.choice([0, 1, 2]), rich_np_adjs(rng),
                              RICH_SUBJ, RICH_OBJ, 0.4, ADVERBS[adverb][1])
        c.adverb = adverb
        return c.english(front_adverb=True), capitalise(c.german(front_adverb=True))
    # subordinate clause: main + because/when + verb-final clause, or clause first
    conj = rng.choice(sorted(CONJ))
    main = random_transitive(rng, rng.choice([0, 1]), rng.choice([0, 1, 2]),
                             RICH_SUBJ, RICH_OBJ, 0.2)
    if rng.random() < 0.5:
        sub = random_copula(rng, ["def", "indef", "name"], rng.choice([0, 1]))
    else:
        sub = random_transitive(rng, 0, rng.choice([0, 1]), ["def", "name"],
                                ["def", "indef", "num"], 0.3)
    first = conj == "when" and rng.random() < 0.5
    if first and rng.random() < 0.5:
        main = random_copula(rng, ["def", "name"], rng.choice([0, 1]))
    return subordinate(main, conj, sub, first)


# ---------------------------------------------------------------------------
# Spoken question answering (LibriSQA-style open answers)
# ---------------------------------------------------------------------------


def sqa_item(rng):
    """Return (passage_words, passage_for_tts, question, answer)."""
    names = rng.sample(sorted(NAMES), 3)
    nouns = rng.sample(THINGS, 3)
    facts = []                           # (type, english sentence, data)
    used = set(nouns)                    # keeps every "who ..." question unambiguous
    for name, noun in zip(names, nouns):
        kind = rng.choice(["has1", "hasN", "hasN", "live", "see"])
        if kind == "has1":
            col = rng.choice(sorted(ADJ_COLOUR))
            facts.append((kind, f"{name} has a {col} {noun}", (name, noun, col)))
        elif kind == "hasN":
            col = rng.choice(sorted(ADJ_COLOUR))
            num = rng.choice(sorted(NUMBERS))
            pl = NOUNS[noun][0]
            facts.append((kind, f"{name} has {num} {col} {pl}", (name, noun, col, num)))
        elif kind == "live":
            city = rng.choice(sorted(CITIES))
            facts.append((kind, f"{name} lives in {city}", (name, city)))
        else:
            animal = rng.choice([a for a in ANIMALS if a not in used])
            used.add(animal)
            place = rng.choice(sorted(PLACES))
            art = "an" if animal[0] in "aeiou" else "a"
            facts.append((kind, f"{name} sees {art} {animal} {place}", (name, animal, place)))
    # cities must differ for "who lives in X" to be unambiguous
    cities = [f[2][1] for f in facts if f[0] == "live"]
    if len(cities) != len(set(cities)):
        return None
    n_facts = 3 if rng.random() < 0.7 else 2
    facts = facts[:n_facts]
    kind, sentence, data = rng.choice(facts)
    name = data[0]
    if kind == "has1":
        _, noun, col = data
        q = rng.choice([f"what colour is {name}'s {noun}?",
                        f"who has the {col} {noun}?",
                        f"what does {name} have?"])
        answer = sentence
    elif kind == "hasN":
        _, noun, col, num = data
        pl = NOUNS[noun][0]
        q, answer = rng.choice([
            (f"how many {pl} does {name} have?", f"{name} has {num} {pl}"),
            (f"what colour are {name}'s {pl}?", sentence),
            (f"who has the {col} {pl}?", sentence)])
    elif kind == "live":
        _, city = data
        q = rng.choice([f"where does {name} live?", f"who lives in {city}?"])
        answer = sentence
    else:
        _, animal, place = data
        q = rng.choice([f"what does {name} see?", f"where does {name} see the {animal}?",
                        f"who sees the {animal}?"])
        answer = sentence
    passage = " ".join(f[1] for f in facts)          # stored text: no punctuation
    tts = ". ".join(f[1] for f in facts) + "."        # periods = pauses when spoken
    return passage, tts, q, answer


# ---------------------------------------------------------------------------
# Building the text of all splits
# ---------------------------------------------------------------------------


def n_words(s):
    return len(s.split())


def sample_unique(rng, gen, n, seen, min_words, max_words, max_tries=200000):
    out = []
    tries = 0
    while len(out) < n and tries < max_tries:
        tries += 1
        en, de = gen(rng)
        if en in seen or not (min_words <= n_words(en) <= max_words):
            continue
        seen.add(en)
        out.append((en, de))
    if len(out) < n:
        sys.exit(f"could only generate {len(out)} of {n} unique sentences")
    return out


def vocabulary(texts):
    return {w for t in texts for w in t.split()}


def build_text(rng, scale):
    sizes = {s: max(1, round(n * scale)) for s, n in SIZES["speech"].items()}
    seen = set()
    speech = {"pretrain": sample_unique(rng, pretrain_sentence, sizes["pretrain"],
                                        seen, 3, 12)}
    for split in ("train", "dev", "test"):
        speech[split] = sample_unique(rng, shifted_sentence, sizes[split], seen, 7, 14)

    sqa = {}
    seen_passages = set()
    for split, n in SIZES["sqa"].items():
        items = []
        while len(items) < max(1, round(n * scale)):
            item = sqa_item(rng)
            if item is None or item[0] in seen_passages:
                continue
            seen_passages.add(item[0])
            items.append(item)
        sqa[split] = items

    # Vocabulary check: every word heard or produced after pretraining must
    # occur in the pretrain sentences.  Add pretrain sentences that contain a
    # missing word until none is missing (matters only for tiny --scale).
    needed = vocabulary(en for s in ("train", "dev", "test") for en, _ in speech[s])
    needed |= vocabulary(p for items in sqa.values() for p, _, _, a in items)
    needed |= vocabulary(a for items in sqa.values() for _, _, _, a in items)
    missing = needed - vocabulary(en for en, _ in speech["pretrain"])
    tries = 0
    while missing and tries < 500000:
        tries += 1
        en, de = pretrain_sentence(rng)
        if en in seen or not (3 <= n_words(en) <= 12) or not (set(en.split()) & missing):
            continue
        seen.add(en)
        speech["pretrain"].append((en, de))
        missing -= set(en.split())
    if missing:
        sys.exit(f"words never produced by the pretrain grammar: {sorted(missing)}")
    return speech, sqa


# ---------------------------------------------------------------------------
# Speech synthesis
# ---------------------------------------------------------------------------


def synth_wav(text, voice, speed, pitch):
    """espeak-ng -> sox (16 kHz mono 16 bit, -1 dB gain, silence trim) -> float32."""
    espeak = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True, check=True)
    sox = subprocess.run(
        ["sox", "-D",                       # -D: no dither, keeps output deterministic
         "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
         "-t", "wav", "-", "gain", "-1",
         # trim leading and trailing silence, then keep 50 ms on each side
         "silence", "1", "0.01", "0.1%", "reverse", "silence", "1", "0.01", "0.1%",
         "reverse", "pad", "0.05", "0.05"],
        input=espeak.stdout, capture_output=True, check=True)
    x, sr = sf.read(io.BytesIO(sox.stdout), dtype="float32")
    assert sr == SAMPLE_RATE and x.ndim == 1
    return x


def synth_job(job):
    """Pool worker: synthesise one utterance and write it as OGG Opus."""
    path, text, voice, speed, pitch = job
    x = synth_wav(text, voice, speed, pitch)
    sf.write(path, x, SAMPLE_RATE, format="OGG", subtype="OPUS",
             compression_level=OPUS_COMPRESSION)
    return len(x) / SAMPLE_RATE


def working_voices():
    ok = {}
    for group, voices in VOICES.items():
        ok[group] = []
        for v in voices:
            try:
                x = synth_wav("hello there", v, 160, 50)
                if len(x) > SAMPLE_RATE * 0.2:
                    ok[group].append(v)
                    continue
            except (subprocess.CalledProcessError, AssertionError, RuntimeError):
                pass
            print(f"  voice {v!r} (group {group}) failed, skipped")
        if not ok[group]:
            sys.exit(f"no working voice in group {group}")
    return ok


def draw_voice(rng, split, voices):
    groups = sorted(VOICE_MIX[split])
    group = rng.choices(groups, weights=[VOICE_MIX[split][g] for g in groups])[0]
    return (rng.choice(voices[group]), rng.randint(*SPEED_RANGE),
            rng.randint(*PITCH_RANGE))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=here, help="output data directory")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies all sizes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bridge", type=float, default=BRIDGE,
                    help="share of pretrain sentences with train's constructions, short")
    args = ap.parse_args()
    globals()["BRIDGE"] = args.bridge
    t0 = time.time()
    rng = random.Random(args.seed)

    print("checking voices ...")
    voices = working_voices()
    for g, vs in voices.items():
        print(f"  {g}: {', '.join(vs)}")

    speech, sqa = build_text(rng, args.scale)

    # Remove only what this script generates.
    out = args.out
    shutil.rmtree(os.path.join(out, "audio"), ignore_errors=True)
    for task in ("ast", "asr", "sqa"):
        os.makedirs(os.path.join(out, task), exist_ok=True)
        for split in ("pretrain", "train", "dev", "test"):
            p = os.path.join(out, task, f"{split}.jsonl")
            if os.path.exists(p):
                os.remove(p)

    jobs, meta = [], []
    manifests = {}
    for split, pairs in speech.items():
        os.makedirs(os.path.join(out, "audio", split), exist_ok=True)
        ast_rows, asr_rows = [], []
        for i, (en, de) in enumerate(pairs):
            uid = f"{split}-{i:05d}"
            rel = f"audio/{split}/{i:05d}.ogg"
            voice, speed, pitch = draw_voice(rng, split, voices)
            jobs.append((os.path.join(out, rel), en, voice, speed, pitch))
            meta.append({"id": uid, "audio": rel, "voice": voice, "speed": speed,
                         "pitch": pitch, "tts_text": en})
            ast_rows.append({"id": uid, "audio": "../" + rel, "task": "ast",
                             "text": rng.choice(PROMPTS["ast"]), "target": de})
            asr_rows.append({"id": uid, "audio": "../" + rel, "task": "asr",
                             "text": rng.choice(PROMPTS["asr"]), "target": en})
        manifests[("ast", split)] = ast_rows
        manifests[("asr", split)] = asr_rows
    for split, items in sqa.items():
        rows = []
        for i, (passage, tts, question, answer) in enumerate(items):
            uid = f"sqa-{split}-{i:05d}"
            rel = f"audio/{split}/sqa-{i:05d}.ogg"
            voice, speed, pitch = draw_voice(rng, split, voices)
            jobs.append((os.path.join(out, rel), tts, voice, speed, pitch))
            meta.append({"id": uid, "audio": rel, "voice": voice, "speed": speed,
                         "pitch": pitch, "tts_text": tts, "passage": passage})
            prompt = rng.choice(PROMPTS["sqa"]).format(question=question)
            rows.append({"id": uid, "audio": "../" + rel, "task": "sqa",
                         "text": prompt, "target": answer})
        manifests[("sqa", split)] = rows

    for (task, split), rows in manifests.items():
        write_jsonl(os.path.join(out, task, f"{split}.jsonl"), rows)
    print(f"text done in {time.time() - t0:.1f}s; synthesising {len(jobs)} utterances "
          f"with {args.workers} workers ...")

    durations = []
    with Pool(args.workers) as pool:
        for k, d in enumerate(pool.imap(synth_job, jobs, chunksize=8)):
            durations.append(d)
            if (k + 1) % 500 == 0 or k + 1 == len(jobs):
                print(f"  {k + 1}/{len(jobs)}  ({time.time() - t0:.0f}s)", flush=True)
    for m, d in zip(meta, durations):
        m["duration"] = round(d, 3)
    # Synthesis details (voice, speed, pitch, duration) for analysis.
    write_jsonl(os.path.join(out, "audio", "synthesis.jsonl"), meta)

    # Summary.
    print("\nsplit summary (utterances, hours of audio):")
    by = {}
    for m, d in zip(meta, durations):
        split = m["audio"].split("/")[1]
        key = (("sqa" if m["id"].startswith("sqa") else "ast/asr"), split)
        n, s = by.get(key, (0, 0.0))
        by[key] = (n + 1, s + d)
    for (task, split), (n, s) in by.items():
        print(f"  {task:8s} {split:9s} {n:5d} utts {s / 60:7.1f} min  mean {s / n:.2f}s")
    size = sum(os.path.getsize(os.path.join(dp, f))
               for dp, _, fs in os.walk(os.path.join(out, "audio")) for f in fs)
    print(f"audio size: {size / 1e6:.1f} MB; total {sum(durations) / 3600:.2f} h; "
          f"wall time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
