"""Make the shared example corpus and tokenizer, deterministically and licence-clean.

    python examples/data/make_corpus.py            # writes corpus.jsonl and tokenizer/ next to this file

The text comes from a small template grammar written for Primus (no third-party text), so it can
be committed and redistributed. Sentences follow recurring patterns about recurring characters,
which gives a tiny model something to learn in a few dozen steps. The tokenizer is a byte-level
BPE with 512 entries (the vocab_size of the tiny model presets), saved as a Hugging Face fast
tokenizer directory that `AutoTokenizer.from_pretrained` loads offline.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601
DOCUMENTS = 700
VOCAB_SIZE = 512
EOS = "<|endoftext|>"
PAD = "<|pad|>"

NAMES = ["Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "June", "Kofi", "Lena",
         "Mira", "Nils", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tova"]
ROLES = ["baker", "pilot", "teacher", "farmer", "painter", "doctor", "sailor", "miner", "weaver", "clerk"]
PLACES = ["the market", "the harbour", "the old mill", "the library", "the hill", "the river bank", "the station",
          "the garden", "the bridge", "the square"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "on Monday", "before the rain",
         "after the storm", "during the fair", "at dawn", "in winter"]
OBJECTS = ["a basket of apples", "an old map", "a red kite", "a loaf of bread", "a brass key", "a small boat",
           "a letter", "a lantern", "a wooden box", "a blue coat", "a jar of honey", "a new book"]
ADJECTIVES = ["quiet", "busy", "cold", "bright", "crowded", "empty", "warm", "windy", "calm", "noisy"]
VERBS = [("carried", "carry"), ("found", "find"), ("painted", "paint"), ("sold", "sell"), ("mended", "mend"),
         ("bought", "buy"), ("hid", "hide"), ("opened", "open"), ("lost", "lose"), ("gave away", "give away")]
FEELINGS = ["happy", "tired", "curious", "worried", "proud", "calm", "hungry", "surprised"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]


def sentence(rng: random.Random, hero: str, friend: str, role: str) -> str:
    verb_past, verb_base = rng.choice(VERBS)
    obj, place, time_ = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(TIMES)
    templates = [
        f"{hero} {verb_past} {obj} at {place} {time_}.",
        f"{time_.capitalize()}, {hero} walked to {place} with {friend}.",
        f"The {role} said that {place} was {rng.choice(ADJECTIVES)} {time_}.",
        f"{friend} asked {hero} to {verb_base} {obj}.",
        f"{hero} felt {rng.choice(FEELINGS)} because {friend} {verb_past} {obj}.",
        f"At {place}, {rng.choice(NUMBERS)} people waited for the {role}.",
        f"{hero} is a {role}, and {friend} is a friend of the {role}.",
        f"When {friend} saw {obj}, {friend} felt {rng.choice(FEELINGS)}.",
        f"\"Where is {obj}?\" asked {friend}. \"At {place},\" said {hero}.",
        f"{hero} counted {rng.choice(NUMBERS)} lanterns on the way to {place}.",
    ]
    return rng.choice(templates)


def document(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    role = rng.choice(ROLES)
    opening = f"This is a story about {hero}, the {role}."
    body = [sentence(rng, hero, friend, role) for _ in range(rng.randint(4, 9))]
    closing = f"In the end, {hero} and {friend} went home {rng.choice(TIMES)}."
    return " ".join([opening, *body, closing])


def write_corpus(path: Path, documents: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = [document(rng) for _ in range(documents)]
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return docs


def train_tokenizer(docs: list[str], out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for corpus.jsonl and tokenizer/")
    parser.add_argument("--documents", type=int, default=DOCUMENTS)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    docs = write_corpus(args.out / "corpus.jsonl", args.documents, SEED)
    train_tokenizer(docs, args.out / "tokenizer", args.vocab_size)
    size = (args.out / "corpus.jsonl").stat().st_size
    print(f"wrote {len(docs)} documents ({size / 1024:.0f} KiB) to {args.out / 'corpus.jsonl'} and a "
          f"{args.vocab_size}-token byte-level BPE to {args.out / 'tokenizer'}")


if __name__ == "__main__":
    main()
