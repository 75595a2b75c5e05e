"""Synthetic knowledge domains: data files of nonce-word templates, instantiated with seeds.

A domain file (JSON) lists placeholder names, template sentences with a role (premise,
implied, negation, reversed, subchain, control) and an expected direction, groups of
sentences fine-tuned on together, and the checks the logic desiderata read. Nonce words
are generated pseudo-words that the model's tokenizer splits into a few rare pieces, so
the model cannot know them beforehand; several instantiations make results averages.
"""

from __future__ import annotations

import importlib.resources
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTROL_ID = "control"
CONTROL_TEXT = "in winter, frogs hibernate in the mud."
ROLES = ("premise", "implied", "negation", "reversed", "subchain", "control")
_REQUIRED = ("name", "placeholders", "sentences")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Sentence:
    id: str
    text: str
    role: str
    expect: str = ""


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    placeholders: tuple[str, ...]
    sentences: tuple[Sentence, ...]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def sentence_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.sentences)


@dataclass(frozen=True)
class Instance:
    """One instantiation: the words chosen and every sentence's text (control included)."""

    domain: Domain
    index: int
    words: dict[str, str]
    texts: dict[str, str]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.texts)

    def rows(self) -> tuple[list[str], list[list[int]]]:
        """Row ids and index groups: every sentence alone, then each named group."""
        ids = list(self.texts)
        names = ids + list(self.domain.groups)
        groups = [[i] for i in range(len(ids))]
        groups += [[ids.index(m) for m in members] for members in self.domain.groups.values()]
        return names, groups


def available_domains() -> list[str]:
    folder = importlib.resources.files("datafluence") / "data" / "domains"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def load_domain(name_or_path: str | Path) -> Domain:
    """A shipped domain by name, or a domain file by path; checked with clear errors."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"domain file {path} does not exist")
        text = path.read_text()
    else:
        known = available_domains()
        if str(name_or_path) not in known:
            raise ValueError(f"unknown domain {name_or_path!r}; shipped domains: {known}")
        resource = importlib.resources.files("datafluence") / "data" / "domains"
        text = (resource / f"{name_or_path}.json").read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"domain {name_or_path}: not valid JSON ({err})") from err
    return parse_domain(raw, str(name_or_path))


def parse_domain(raw: dict[str, Any], source: str = "domain") -> Domain:
    for key in _REQUIRED:
        if key not in raw:
            raise ValueError(f"{source}: missing field {key!r} (a domain needs {list(_REQUIRED)})")
    placeholders = tuple(raw["placeholders"])
    sentences = []
    for k, entry in enumerate(raw["sentences"]):
        for key in ("id", "text", "role"):
            if key not in entry:
                raise ValueError(f"{source}: sentence {k} is missing field {key!r}")
        if entry["role"] not in ROLES:
            raise ValueError(
                f"{source}: sentence {entry['id']!r} has unknown role {entry['role']!r}; use one of {ROLES}"
            )
        unknown = set(_PLACEHOLDER.findall(entry["text"])) - set(placeholders)
        if unknown:
            raise ValueError(
                f"{source}: sentence {entry['id']!r} uses unknown placeholder(s) "
                f"{sorted(unknown)}; declare them in 'placeholders' {list(placeholders)}"
            )
        sentences.append(
            Sentence(entry["id"], entry["text"], entry["role"], entry.get("expect", ""))
        )
    ids = [s.id for s in sentences]
    if len(set(ids)) != len(ids) or CONTROL_ID in ids:
        raise ValueError(f"{source}: sentence ids must be unique and not {CONTROL_ID!r}")
    groups = {name: tuple(members) for name, members in raw.get("groups", {}).items()}
    for name, members in groups.items():
        missing = set(members) - set(ids)
        if missing:
            raise ValueError(f"{source}: group {name!r} names unknown sentences {sorted(missing)}")
    checks = raw.get("checks", {})
    known = set(ids) | set(groups) | {CONTROL_ID}
    for check, spec in checks.items():
        for value in spec.values():
            names = value if isinstance(value, list) else [value]
            missing = set(names) - known
            if missing:
                raise ValueError(
                    f"{source}: check {check!r} names unknown sentences {sorted(missing)}"
                )
    return Domain(
        raw["name"], raw.get("description", ""), placeholders, tuple(sentences), groups, checks
    )


def nonce_words(
    tokenizer: Any, n: int, seed: int, min_tokens: int = 2, max_tokens: int = 3
) -> list[str]:
    """n distinct pseudo-words (CVCVC-like) that the tokenizer splits into a few pieces.

    Words that are a single token are likely real words the model knows, and long splits
    make sentences long, so the default keeps words of 2-3 tokens (with a leading space).
    """
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    found: list[str] = []
    for _ in range(20000):
        pattern = rng.choice(["CVCVC", "CVCCV", "CVCV", "CVVC", "CVCVCV"])
        word = "".join(rng.choice(consonants if c == "C" else vowels) for c in pattern)
        if word in found:
            continue
        count = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if min_tokens <= count <= max_tokens:
            found.append(word)
            if len(found) == n:
                return found
    raise ValueError(
        f"could not find {n} pseudo-words of {min_tokens}-{max_tokens} tokens; widen the range"
    )


def instantiate(domain: Domain, tokenizer: Any, n_instances: int, seed: int = 0) -> list[Instance]:
    """Several instantiations, each with its own nonce words, plus the control sentence."""
    if n_instances < 1:
        raise ValueError(f"n_instances must be at least 1, got {n_instances}")
    out = []
    for k in range(n_instances):
        words = nonce_words(tokenizer, len(domain.placeholders), seed=seed * 1000 + k)
        mapping = dict(zip(domain.placeholders, words, strict=True))
        texts = {s.id: s.text.format(**mapping) for s in domain.sentences}
        texts[CONTROL_ID] = CONTROL_TEXT
        out.append(Instance(domain, k, mapping, texts))
    return out
