"""A small English speech corpus rendered locally by espeak-ng, in LJSpeech format (for ProDiff).

Sentences come from a seeded procedural grammar (statements, questions, clauses joined by commas,
numbers); each is rendered by :func:`dpm.data.speech.render` and written as

    out/metadata.csv        DPM001-0001|text|text  (LJSpeech's id|text|normalized_text)
    out/wavs/<id>.wav       mono 16-bit PCM at 22050 Hz
    out/alignments.json     per id: espeak's phonemes and their boundaries in samples
    out/manifest.json       the build's arguments and the espeak-ng version

which :func:`dpm.data.speech.load_ljspeech` reads. Building is deterministic and atomic (written
to a temporary folder, then renamed); a folder already built with the same arguments is kept.

    python -m experiments.speech_corpus --out runs/speech --num_sentences 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time

from dpm.data.audio import write_wav
from dpm.data.speech import espeak_version, render

__all__ = ["build", "sentences"]

# ------------------------------------------------------------------ grammar

_ADJECTIVES = (
    "old", "young", "quiet", "bright", "small", "heavy", "gentle", "careful", "tired", "clever",
    "green", "silver", "broken", "famous", "strange", "patient", "hungry", "wooden", "narrow",
    "distant", "golden", "busy", "curious", "empty",
)  # fmt: skip
_NOUNS = (
    ("captain", "captains"), ("farmer", "farmers"), ("teacher", "teachers"),
    ("doctor", "doctors"), ("child", "children"), ("sailor", "sailors"),
    ("painter", "painters"), ("driver", "drivers"), ("neighbor", "neighbors"),
    ("clerk", "clerks"), ("baker", "bakers"), ("student", "students"), ("guard", "guards"),
    ("pilot", "pilots"), ("singer", "singers"), ("fox", "foxes"), ("horse", "horses"),
    ("bird", "birds"), ("cat", "cats"), ("dog", "dogs"),
)  # fmt: skip
_THINGS = (
    ("letter", "letters"), ("lamp", "lamps"), ("basket", "baskets"), ("window", "windows"),
    ("map", "maps"), ("bottle", "bottles"), ("key", "keys"), ("boat", "boats"),
    ("bridge", "bridges"), ("garden", "gardens"), ("book", "books"), ("coat", "coats"),
    ("bell", "bells"), ("clock", "clocks"), ("table", "tables"), ("ladder", "ladders"),
    ("stone", "stones"), ("wagon", "wagons"), ("picture", "pictures"), ("river", "rivers"),
)  # fmt: skip
_NAMES = (
    "Anna", "Thomas", "Maria", "Oliver", "Grace", "Samuel", "Clara", "Henry", "Lucy", "Peter",
)  # fmt: skip
# (base, past) of transitive verbs
_VERBS = (
    ("find", "found"), ("paint", "painted"), ("carry", "carried"), ("open", "opened"),
    ("watch", "watched"), ("follow", "followed"), ("clean", "cleaned"), ("repair", "repaired"),
    ("borrow", "borrowed"), ("notice", "noticed"), ("sell", "sold"), ("build", "built"),
    ("hide", "hid"), ("bring", "brought"), ("count", "counted"), ("move", "moved"),
)  # fmt: skip
_INTRANSITIVE = (
    ("smile", "smiled"), ("wait", "waited"), ("laugh", "laughed"), ("sleep", "slept"),
    ("arrive", "arrived"), ("leave", "left"), ("sing", "sang"), ("rest", "rested"),
    ("listen", "listened"), ("return", "returned"),
)  # fmt: skip
_ADVERBS = (
    "quietly", "slowly", "quickly", "carefully", "again", "yesterday", "today", "early",
    "happily", "suddenly", "finally", "twice",
)  # fmt: skip
_PLACES = (
    "near the river", "in the garden", "behind the station", "under the bridge",
    "at the market", "on the hill", "by the window", "across the street", "in the village",
    "beside the old mill", "at the harbor", "inside the house",
)  # fmt: skip
_OPENERS = (
    "After the storm", "In the morning", "Without a word", "Once again", "Later that night",
    "Before the meeting", "As usual", "Last winter", "At noon", "For a moment",
)  # fmt: skip
_CONJUNCTIONS = ("and", "but", "so", "while")
_NUMBERS = (
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "fifteen", "twenty", "thirty", "forty", "a hundred",
)  # fmt: skip


def _subject(r: random.Random) -> str:
    k = r.random()
    if k < 0.2:
        return r.choice(_NAMES)
    noun = r.choice(_NOUNS)[0]
    if k < 0.6:
        return f"the {r.choice(_ADJECTIVES)} {noun}"
    return f"{r.choice(('the', 'a', 'our', 'my'))} {noun}"


def _object(r: random.Random) -> str:
    k = r.random()
    if k < 0.25:
        return f"{r.choice(_NUMBERS + (str(r.randint(2, 1999)),))} {r.choice(_THINGS)[1]}"
    thing = r.choice(_THINGS)[0]
    if k < 0.7:
        return f"the {r.choice(_ADJECTIVES)} {thing}"
    return f"{r.choice(('the', 'a', 'her', 'his', 'their'))} {thing}"


def _clause(r: random.Random) -> str:
    """subject verb [object] [adverb] [place], in the past tense."""
    words = [_subject(r)]
    if r.random() < 0.7:
        words += [r.choice(_VERBS)[1], _object(r)]
    else:
        words.append(r.choice(_INTRANSITIVE)[1])
    if r.random() < 0.4:
        words.append(r.choice(_ADVERBS))
    if r.random() < 0.4:
        words.append(r.choice(_PLACES))
    return " ".join(words)


def _question(r: random.Random) -> str:
    k = r.random()
    if k < 0.35:
        verb = r.choice(_VERBS)[0]
        return f"did {_subject(r)} {verb} {_object(r)}?"
    if k < 0.6:
        return f"where did {_subject(r)} {r.choice(_INTRANSITIVE)[0]}?"
    if k < 0.8:
        return f"how many {r.choice(_THINGS)[1]} were {r.choice(_PLACES)}?"
    return f"why is the {r.choice(_THINGS)[0]} so {r.choice(_ADJECTIVES)}?"


def _sentence(r: random.Random) -> str:
    k = r.random()
    if k < 0.35:
        body = _clause(r) + "."
    elif k < 0.55:
        body = f"{r.choice(_OPENERS)}, {_clause(r)}."
    elif k < 0.75:
        body = f"{_clause(r)}, {r.choice(_CONJUNCTIONS)} {_clause(r)}."
    elif k < 0.9:
        body = _question(r)
    else:
        body = f"{r.choice(_NUMBERS).capitalize()} {r.choice(_NOUNS)[1]} {r.choice(_VERBS)[1]} "
        body += f"{_object(r)}."
    return body[0].upper() + body[1:]


def sentences(n: int, seed: int = 0, *, min_words: int = 4, max_words: int = 14) -> list[str]:
    """``n`` distinct English sentences of ``min_words``..``max_words`` words (deterministic).

    Args:
      n: how many.
      seed: seed of the ``random.Random`` that drives the grammar.
      min_words: fewest words per sentence.
      max_words: most words per sentence.

    Returns:
      the sentences, in the order drawn.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    r = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        s = _sentence(r)
        if min_words <= len(s.split()) <= max_words and s not in seen:
            seen.add(s)
            out.append(s)
            if len(out) == n:
                return out
    raise ValueError(f"the grammar gave only {len(out)} distinct sentences, fewer than n={n}")


# ------------------------------------------------------------------ building


def _manifest(num_sentences: int, seed: int, voice: str, rate: int) -> dict:
    return {
        "num_sentences": int(num_sentences),
        "seed": int(seed),
        "voice": voice,
        "rate": int(rate),
        "espeak_version": espeak_version(),
    }


def build(
    out_dir: str | os.PathLike,
    *,
    num_sentences: int = 300,
    seed: int = 0,
    voice: str = "en-us",
    rate: int = 175,
    overwrite: bool = False,
) -> str:
    """Renders ``num_sentences`` sentences into an LJSpeech-format folder (see the module doc).

    Args:
      out_dir: the corpus folder; kept as it is when it was built with the same arguments.
      num_sentences: how many sentences (ids ``DPM001-0001`` ...).
      seed: seed of the grammar.
      voice: espeak-ng voice.
      rate: speaking rate, words per minute.
      overwrite: replace a folder built with other arguments (otherwise that is an error).

    Returns:
      ``out_dir``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    manifest = _manifest(num_sentences, seed, voice, rate)
    if os.path.exists(out_dir):
        found = None
        manifest_path = os.path.join(out_dir, "manifest.json")
        if os.path.isfile(manifest_path):
            with open(manifest_path, encoding="utf-8") as f:
                found = json.load(f)
        if found == manifest:
            return out_dir
        if not overwrite:
            what = f"a corpus built with {found}" if found else "something other than a corpus"
            raise ValueError(
                f"out_dir={out_dir!r} holds {what}, not {manifest}; pass overwrite=True "
                "(--overwrite) to replace it, or choose another out_dir"
            )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "wavs"))
        width = max(4, len(str(num_sentences)))
        lines, alignments, sample_rate = [], {}, None
        for k, text in enumerate(sentences(num_sentences, seed), 1):
            item = f"DPM001-{k:0{width}d}"
            utt = render(text, voice=voice, rate=rate)
            sample_rate = utt.sample_rate
            write_wav(os.path.join(tmp, "wavs", f"{item}.wav"), utt.wav, utt.sample_rate)
            lines.append(f"{item}|{text}|{text}\n")
            alignments[item] = {
                "phonemes": list(utt.phonemes),
                "boundaries": utt.boundaries.tolist(),
            }
        with open(os.path.join(tmp, "metadata.csv"), "w", encoding="utf-8") as f:
            f.writelines(lines)
        align = {
            "format": "dpm-speech-alignments",
            "version": 1,
            "sample_rate": sample_rate,
            "utterances": alignments,
        }
        with open(os.path.join(tmp, "alignments.json"), "w", encoding="utf-8") as f:
            json.dump(align, f, ensure_ascii=False)
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/speech", help="corpus folder")
    parser.add_argument("--num_sentences", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voice", default="en-us")
    parser.add_argument("--rate", type=int, default=175, help="words per minute")
    parser.add_argument("--overwrite", action="store_true", help="replace another build")
    args = parser.parse_args(argv)
    start, wall = time.perf_counter(), time.time()
    try:
        out = build(
            args.out,
            num_sentences=args.num_sentences,
            seed=args.seed,
            voice=args.voice,
            rate=args.rate,
            overwrite=args.overwrite,
        )
    except ValueError as e:
        parser.error(str(e))
    manifest_path = os.path.join(out, "manifest.json")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    if os.path.getmtime(manifest_path) < wall - 1.0:
        print(f"{out}: {manifest['num_sentences']} sentences, already built with these arguments")
    else:
        seconds = time.perf_counter() - start
        print(f"{out}: built {manifest['num_sentences']} sentences in {seconds:.1f} s")


if __name__ == "__main__":
    main()
