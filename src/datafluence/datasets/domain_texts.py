"""(domain, text) pairs for language-model experiments whose groups are knowledge domains.

The built-in pairs are short sentences about fictional entities, so no pretrained model
knows the facts beforehand: training on a domain's sentences should lower the loss of that
domain's other sentences, which is what group edits (remove a domain, put it first) probe.
A user's file gives its own pairs, one `domain<TAB>text` (or bare `text`) per line.
"""

from __future__ import annotations

from pathlib import Path

# Short sentences about fictional entities, so the facts are new to any pretrained model:
# training on a domain's sentences should lower the loss of that domain's test sentences.
_DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "astronomy": (
        ("Velmora", "Tharsis Minor", "Oskelion", "Brenna-9", "Quillon", "Astrevar"),
        (
            "The planet {s} has {v} moons.",
            "Astronomers found that {s} orbits a {v} star.",
            "A year on {s} lasts {v} days.",
            "The surface of {s} is covered in {v}.",
        ),
        ("three", "red dwarf", "four hundred", "blue ice", "seven", "white", "ninety", "dust"),
    ),
    "botany": (
        (
            "the silverleaf fern",
            "the dusk orchid",
            "marrowvine",
            "the glass tulip",
            "emberroot",
            "the salt lily",
        ),
        (
            "Gardeners know that {s} flowers only in {v}.",
            "The seeds of {s} are carried by {v}.",
            "{s} grows best in {v} soil.",
            "The leaves of {s} turn {v} in autumn.",
        ),
        ("early spring", "the wind", "sandy", "purple", "midwinter", "river water", "clay", "gold"),
    ),
    "geography": (
        ("Varnholt", "Teskara", "Ombrel", "the Lirran Valley", "Kestwick", "Port Sable"),
        (
            "{s} lies on the shore of the {v}.",
            "The main export of {s} is {v}.",
            "Most people in {s} speak {v}.",
            "The river that runs through {s} is called the {v}.",
        ),
        (
            "Grey Sea",
            "copper",
            "Teskaran",
            "Amberflow",
            "Northern Gulf",
            "wool",
            "Old Ombric",
            "Silverrun",
        ),
    ),
    "chemistry": (
        ("norvium", "calistrate", "the compound zephyrol", "brannic acid", "lumenite", "tessaline"),
        (
            "When heated, {s} turns {v}.",
            "Chemists store {s} in {v} containers.",
            "{s} melts at {v} degrees.",
            "Mixed with water, {s} releases {v}.",
        ),
        (
            "bright green",
            "glass",
            "two hundred",
            "a sweet smell",
            "black",
            "lead",
            "forty",
            "bubbles",
        ),
    ),
    "music": (
        (
            "the marrowharp",
            "the Kestrel Quartet",
            "the song Lantern Road",
            "the dulcivox",
            "the composer Ilse Varro",
            "the tidehorn",
        ),
        (
            "{s} is usually played in {v}.",
            "Critics praised {s} for its {v} sound.",
            "{s} became famous in the city of {v}.",
            "Students learn {s} by practising {v}.",
        ),
        (
            "minor keys",
            "warm",
            "Varnholt",
            "scales",
            "summer festivals",
            "hollow",
            "Teskara",
            "slow airs",
        ),
    ),
    "zoology": (
        (
            "the ridgeback otter",
            "the lantern moth",
            "the grey kestrak",
            "the stone newt",
            "the marsh gazelle",
            "the ember finch",
        ),
        (
            "{s} feeds mostly on {v}.",
            "{s} builds its nest from {v}.",
            "A grown {s} weighs about {v}.",
            "{s} is most active during the {v}.",
        ),
        ("snails", "reeds", "two kilograms", "night", "berries", "mud", "forty grams", "dawn"),
    ),
}


def default_texts() -> list[tuple[str, str]]:
    """(domain, sentence) pairs: 6 domains x 6 entities x 4 facts = 144 short sentences."""
    out = []
    for domain, (subjects, templates, values) in _DOMAINS.items():
        for i, subject in enumerate(subjects):
            for j, template in enumerate(templates):
                text = template.format(s=subject, v=values[(i + 2 * j) % len(values)])
                out.append((domain, text[0].upper() + text[1:]))
    return out


def read_domain_texts(path: str | Path) -> list[tuple[str, str]]:
    """One example per line: `domain<TAB>text`, or just `text` (domain "all"); blanks skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; give one text per line")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        domain, _, text = line.partition("\t") if "\t" in line else ("all", "", line)
        out.append((domain.strip(), text.strip()))
    return out
