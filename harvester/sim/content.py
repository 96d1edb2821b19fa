"""What a completing id's Completion says: text fragments, the per-seed pool, one document per id.

Everything is drawn from ``random.Random(digest)`` (the id's own blake2b digest) and a pool of
sentences and paragraphs built once per seed, so the same seed and id give the same document,
byte for byte. The document has exactly the fields ``harvester.model`` lists, in its order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from ..model import API_FIELDS, LIST_FIELDS, TARGETING_FIELDS, TEXT_FIELDS

__all__ = ["MAX_FANOUTS", "build_completion"]

_PRODUCTS: Final = (
    "basketball shoes", "noise cancelling headphones", "running shoes", "espresso machines",
    "budget laptops", "robot vacuums", "electric bikes", "standing desks", "air purifiers",
    "travel credit cards", "project management software", "VPN services", "mirrorless cameras",
    "trail running shoes", "gaming monitors", "password managers", "mechanical keyboards",
    "air fryers", "smart thermostats", "e-readers", "hiking backpacks", "dash cams",
    "office chairs", "wireless earbuds", "4K TVs", "coffee grinders", "baby strollers",
    "electric toothbrushes", "CRM tools for startups", "road bikes", "camping tents",
)  # fmt: skip
_QUERY_TEMPLATES: Final = (
    "best {p} for {y}", "top rated {p} {y}", "which {p} do experts recommend in {y}",
    "cheapest {p} with good reviews", "are premium {p} worth it in {y}",
    "{p} buying guide {y}", "what are the most reliable {p}", "compare the best {p} under $300",
)  # fmt: skip
_FANOUT_TEMPLATES: Final = (
    "best {p} {y}", "top rated {p} {y} reviews", "best performance {p} {y}",
    "{p} for beginners {y}", "best {p} for wide feet {y}", "most popular {p} {y}",
    "{p} reddit recommendations", "{p} under $200 {y}", "{p} vs alternatives {y}",
)  # fmt: skip
_BRANDS: Final = (
    "Acme", "Northwind", "Contoso", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay",
    "Soylent", "Tyrell", "Cyberdyne", "Wonka", "Stark", "Gringotts", "Aperture",
    "Müller &amp; Söhne",
)  # fmt: skip
_DOMAINS: Final = (
    "www.rtings.com", "www.techradar.com", "www.tomsguide.com", "www.reddit.com",
    "www.youtube.com", "www.consumerreports.org", "en.wikipedia.org", "www.theverge.com",
    "www.wired.com", "www.outdoorgearlab.com", "www.pcmag.com", "www.cnet.com",
)  # fmt: skip
_SUBJECTS: Final = (
    "The standout pick", "Our runner-up", "This budget option", "The premium model",
    "Reviewers’ favourite", "The lightweight choice", "For most people, the best buy",
    "The value champion", "A café-tested favourite", "The newest release",
)  # fmt: skip
_VERBS: Final = (
    "offers", "delivers", "balances", "combines", "prioritises", "trades away", "excels at",
    "stands out for", "keeps", "improves on",
)  # fmt: skip
_OBJECTS: Final = (
    "durability and comfort", "battery life of roughly 30 hours", "a sturdier build",
    "excellent value at about €180", "responsive cushioning", "low noise under load",
    "a generous two-year warranty", "a naïve but effective setup flow", "class-leading support",
    "predictable performance ±5%", "an easy-to-clean design", "a compact footprint",
)  # fmt: skip
_CLAUSES: Final = (
    "which testers consistently praise", "although stock can be limited",
    "a detail long-term owners mention often", "especially for everyday use",
    "if you can live with the heavier weight", "according to several independent reviews",
    "making it easy to recommend", "though the price fluctuates during sales",
    "so it suits beginners and enthusiasts alike", "with only minor trade-offs",
)  # fmt: skip
_HEADINGS: Final = (
    "Top picks", "Best overall", "Best on a budget", "What to look for", "How we chose",
    "Alternatives worth considering", "Bottom line", "Key differences",
)  # fmt: skip
_PLACES: Final = (
    ("US", "CA", "Los Angeles"), ("US", "NY", "New York"), ("GB", "ENG", "London"),
    ("DE", "BY", "München"), ("FR", "IDF", "Paris"), ("JP", "13", "Tokyo"),
    ("BR", "SP", "São Paulo"), ("IN", "MH", "Mumbai"), ("CA", "ON", "Toronto"),
    ("AU", "NSW", "Sydney"),
)  # fmt: skip
_DEVICES: Final = ("iPhone 15 Pro", "Pixel 8", "Galaxy S24", "iPad Air", "Desktop")
_DISPLAY: Final = {"chatgpt": "ChatGPT", "gemini": "Gemini", "perplexity": "Perplexity"}

# The most fanout queries one document can have (each template is used at most once).
MAX_FANOUTS: Final = len(_FANOUT_TEMPLATES)


def _empty_value(name: str) -> object:
    """What a field the simulator has no content for holds: "", [] or null, by its family."""
    if name in TEXT_FIELDS:
        return ""
    if name in LIST_FIELDS:
        return []
    return None


@dataclass(frozen=True)
class _Pool:
    """Text fragments built once per seed, so each body is only picks and joins."""

    sentences: tuple[str, ...]
    paragraphs: tuple[str, ...]


@lru_cache(maxsize=8)
def _pool(seed: int) -> _Pool:
    """Build the fragment pool for ``seed`` (cached: every id of a run shares it)."""
    rng = random.Random(f"pool:{seed}")
    sentences = tuple(
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}, "
        f"{rng.choice(_CLAUSES)}."
        for _ in range(400)
    )
    paragraphs = tuple(
        "<p>" + " ".join(rng.sample(sentences, rng.randint(2, 5))) + "</p>" for _ in range(300)
    )
    return _Pool(sentences=sentences, paragraphs=paragraphs)


def build_completion(
    digest: bytes,
    *,
    model: str,
    fanouts: tuple[int, int],
    seed: int,
    html_bytes: int,
    targeted_share: float,
) -> dict[str, object]:
    """Assemble the Completion document of one id from the seed's pool and the id's digest.

    ``fanouts`` is the (least, most) number of fanout queries, ``html_bytes`` the typical size of
    the ``html`` field (each id varies 0.6x-1.4x), ``targeted_share`` the share of ids whose
    targeting fields are set. The keys are ``harvester.model.API_FIELDS``, in that order.
    """
    rng = random.Random(digest)
    pool = _pool(seed)
    display = _DISPLAY.get(model, model.capitalize())
    product, year = rng.choice(_PRODUCTS), rng.choice(("2025", "2026"))
    query = rng.choice(_QUERY_TEMPLATES).format(p=product, y=year)
    prompt = (
        '<h4 class="sr-only select-none">You said:</h4>'
        f'<div class="whitespace-pre-wrap user-message">{query}</div>'
    )
    # Small profiles get fewer links so that the completion still fills most of the page.
    sources = _sources_html(rng, product, year, most=min(8, max(2, html_bytes // 1000)))
    ads = _ads_html(rng, product) if rng.random() < 0.3 else ""
    target = int(html_bytes * rng.uniform(0.6, 1.4))
    budget = target - len(prompt) - len(sources) - len(ads) - 400  # 400: the page chrome
    completion = _completion_html(rng, pool, display, product, budget)
    html = (
        '<!DOCTYPE html><html lang="en-US"><head><meta charset="utf-8">'
        f"<title>{query} - {display}</title>"
        '<link rel="stylesheet" href="/assets/app.css"></head><body><div id="root">'
        f'<main class="conversation" data-model="{model}">'
        f'<article data-turn="user">{prompt}</article>'
        f'<article data-turn="assistant">{completion}{sources}{ads}</article>'
        "</main></div></body></html>"
    )
    lo, hi = fanouts
    fanout_queries = [
        t.format(p=product, y=year) for t in rng.sample(_FANOUT_TEMPLATES, rng.randint(lo, hi))
    ]
    content: dict[str, object] = {
        "model": model,
        "query": query,
        "html": html,
        "prompt": prompt,
        "completion": completion,
        "sources": sources,
        "ads": ads,
        "fanouts": fanout_queries,
        **_targeting(rng, targeted_share),
    }
    # model.py decides which fields a Completion has and their order; a field it adds that
    # the simulator has no content for is served empty rather than left out.
    return {name: content.get(name, _empty_value(name)) for name in API_FIELDS}


def _completion_html(
    rng: random.Random, pool: _Pool, display: str, product: str, budget: int
) -> str:
    """Return the completion HTML, paragraphs and lists until ``budget`` characters."""
    parts = [
        f'<h4 class="sr-only select-none">{display} said:</h4>',
        '<div class="markdown prose w-full break-words">',
    ]
    size = 0
    while size < budget or len(parts) < 4:  # at least two blocks, however small the budget
        kind = rng.random()
        if kind < 0.6:
            part = rng.choice(pool.paragraphs)
        elif kind < 0.8:
            items = "".join(
                f"<li><strong>{rng.choice(_BRANDS)} {product}</strong>: "
                f"{rng.choice(pool.sentences)}</li>"
                for _ in range(rng.randint(3, 5))
            )
            part = f"<ul>{items}</ul>"
        else:
            part = f"<h3>{rng.choice(_HEADINGS)}</h3>"
        parts.append(part)
        size += len(part)
    parts.append("</div>")
    return "".join(parts)


def _sources_html(rng: random.Random, product: str, year: str, *, most: int) -> str:
    """Return the sources section: a handful of links about the product."""
    slug = product.lower().replace(" ", "-")
    links = "".join(
        f'<li><a href="https://{rng.choice(_DOMAINS)}/{slug}-{rng.randint(100, 999)}" '
        f'target="_blank" rel="noopener">{rng.choice(_HEADINGS)}: {product} in {year}</a></li>'
        for _ in range(rng.randint(2, most))
    )
    return (
        f'<section aria-label="Sources" class="sources"><h3>Sources</h3><ol>{links}</ol></section>'
    )


def _ads_html(rng: random.Random, product: str) -> str:
    """Return one to three sponsored links."""
    slug = product.lower().replace(" ", "-")
    items = "".join(
        f'<a href="https://shop.example.com/{slug}?ref=ai{rng.randint(1, 99)}" rel="sponsored">'
        f"{rng.choice(_BRANDS)} {product} — save {rng.randint(5, 40)}%</a>"
        for _ in range(rng.randint(1, 3))
    )
    return (
        '<div class="border-token-border-default mt-2 border-t py-4 text-sm">'
        f'<span class="ad-label">Sponsored</span>{items}</div>'
    )


def _targeting(rng: random.Random, targeted_share: float) -> dict[str, str | None]:
    """Return the targeting fields: null unless the id was targeted, as the API does."""
    if rng.random() >= targeted_share:
        return dict.fromkeys(TARGETING_FIELDS)
    country, subdivision, city = rng.choice(_PLACES)
    local = rng.random() < 0.5  # half the targeted ids name a place inside the country
    return {
        "device": rng.choice(_DEVICES) if rng.random() < 0.5 else None,
        "country": country,
        "subdivision": subdivision if local else None,
        "city": city if local else None,
    }
