"""A keyword categoriser: assigns one of the nine harm categories to an uncategorised prompt.

Public harmful-prompt sets such as mlabonne/harmful_behaviors (AdvBench) carry no categories, but
the matched baseline needs one per harmful prompt (its harmless mean is taken per category). A
prompt set with ``categorize: keywords`` (and ``category_column: null``) gets its categories here.

The rules are deliberately simple and fully listed below: the prompt is lower-cased, and the
first category (in ``RULES`` order) with a keyword matching at a word start gets the prompt; a
prompt that matches none is ``misc_harmful``. Each keyword is a regular-expression fragment that
must start at a word boundary and may continue into a longer word (``hack`` matches ``hacking``).
The order settles overlaps: self-harm before violence (``kill myself``), the specific rules
(sexual content, drugs, hacking, surveillance) before the broad words of fraud, harassment and
violence (``steal``, ``threat``, ``harm``). It is a heuristic, not a classifier: each prompt gets
exactly one category, clear requests get the right one, and the rest fall back to
``misc_harmful``; the loader logs how many prompts each category got. On the builtin corpus's
540 hand-labelled harmful prompts (from which some keywords were taken, so this flatters it) it
agrees with the label on 62%; most disagreements are prompts it leaves in ``misc_harmful``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# (category, keywords); the first matching rule wins, in this order
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_harm", (
        "suicid", "kill (?:myself|yourself|themselves|oneself)", "self[- ]harm",
        "cut (?:myself|yourself)", "hurt (?:myself|yourself)", "end (?:my|your) (?:own )?life",
        "anorexi", "bulimi", "eating disorder", "starv(?:e|ing) (?:myself|yourself)", "lethal dose",
        "overdose", "noose", "never wake up", "pro-ana", "artery", "burn (?:myself|yourself)",
        "jump off",
    )),
    ("sexual_content", (
        "sex(?!is)", "porn", "nude", "naked", "erotic", "explicit", "prostitut", "escort service",
        "child abuse material", "pedophil", "revenge porn", "onlyfans",
    )),
    ("drugs_substances", (
        "drug", "cocaine", "heroin", "meth(?:amphetamine)?\\b", "fentanyl", "opioid", "opiate",
        "marijuana", "cannabis", "lsd", "mdma", "ecstasy", "narcotic", "controlled substance",
        "steroid", "sedative", "dmt", "magic mushroom", "sleeping pill", "prescription", "adderall",
        "codeine", "ketamine", "xanax", "oxycodone", "crack cocaine", "psychedelic",
    )),
    ("hacking_cybersecurity", (
        "hack", "malware", "virus", "ransomware", "exploit", "botnet", "ddos", "denial of service",
        "keylog", "trojan", "backdoor", "rootkit", "sql injection", "crack (?:a |the )?password",
        "password", "brute[- ]force", "zero[- ]day", "cyber", "firewall", "antivirus", "worm",
        "phishing kit", "two-factor", "2fa", "sim swap", "malicious", "deface", "website offline",
        "(?:their|its|company's|hospital's|government's) (?:internal )?(?:systems|network)",
    )),
    ("surveillance_privacy", (
        "spy", "spie", "stalk", "gps tracker", "tracker", "hidden camera", "hide a camera",
        "home address", "in secret", "without (?:her|him|them) knowing", "read (?:his|her|their)",
        "surveil", "track (?:someone|a person|their|his|her)", "tracking", "wiretap", "eavesdrop",
        "dox", "personal information", "private information", "location of",
        "monitor (?:someone|their|his|her)", "hidden camera", "secretly record",
        "facial recognition", "without (?:their|his|her) (?:knowledge|consent)",
    )),
    ("fraud_deception", (
        "fraud", "scam", "counterfeit", "launder", "phishing", "forg(?:e|ed|er|ery|ing)\\b", "fake",
        "identity theft", "steal (?:someone's )?identit", "insider trading", "tax evasion",
        "evade tax", "embezzl", "ponzi", "pyramid scheme", "bribe", "cheat", "plagiari",
        "misinformation", "disinformation", "propaganda", "manipulat", "deceiv", "impersonat",
        "credit card", "steal", "shoplift", "irs", "insurance", "unemployment", "pretending to be",
        "pump and dump", "refund", "crowdfunding", "offshore", "robb", "rob (?:a|the|someone)",
        "blackmail", "extort",
    )),
    ("harassment", (
        "harass", "bully", "bullie", "threaten", "threat", "hate speech", "hateful", "insult",
        "defam", "slander", "libel", "racis", "sexis", "discriminat", "humiliat", "intimidat",
        "troll", "demean", "offensive", "slur", "miserable", "death threat", "cruel",
        "falsely accus", "paranoid",
    )),
    ("violence_weapons", (
        "bomb", "explosive", "weapon", "gun", "firearm", "rifle", "ammunition", "grenade", "kill",
        "murder", "assassinat", "assault", "attack", "poison", "terror", "shoot",
        "stab(?:s|bed|bing)?\\b", "violen", "hurt", "injur", "torture", "kidnap", "arson",
        "bioweapon", "chemical weapon", "nerve agent", "massacre", "riot", "silencer", "pistol",
        "handgun", "napalm", "thermite", "strangl", "brain damage", "harm",
    )),
)  # fmt: skip
DEFAULT_CATEGORY = "misc_harmful"
CATEGORIES: tuple[str, ...] = (*(category for category, _ in RULES), DEFAULT_CATEGORY)

_PATTERNS = tuple(
    (category, re.compile(r"\b(?:" + "|".join(keywords) + ")")) for category, keywords in RULES
)


def keyword_category(prompt: str) -> str:
    """The category of the first rule with a keyword in ``prompt``; ``misc_harmful`` if none."""
    text = prompt.lower()
    for category, pattern in _PATTERNS:
        if pattern.search(text):
            return category
    return DEFAULT_CATEGORY


def keyword_categories(prompts: Iterable[str]) -> list[str]:
    return [keyword_category(prompt) for prompt in prompts]


def describe(categories: Iterable[str]) -> str:
    """``category: count`` pairs, most frequent first (for the log line of a categorised set)."""
    return ", ".join(f"{c}: {n}" for c, n in Counter(categories).most_common())
