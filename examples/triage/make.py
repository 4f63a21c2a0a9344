"""Generate the triage dataset shipped with loraplex (deterministic: same seed, same files).

The behaviour it teaches is one the base model lacks: answer a customer message with one line in a
fixed format, ``TRIAGE[<category>|<priority>]``, where the category follows from what the message is
about (billing, shipping, account, technical) and the priority is ``high`` when the customer says it is
urgent, else ``low``. SmolLM2-135M-Instruct answers such messages in prose.

    python examples/triage/make.py          # rewrites train.jsonl and heldout.jsonl beside this file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You triage customer support messages."
TOPICS = {
    "billing": ["I was charged twice for my order", "my invoice shows the wrong amount", "I need a refund for my subscription",
                "my card was billed after I cancelled", "the discount code was not applied to my bill",
                "I was charged a fee I don't recognise", "please send me a copy of last month's invoice",
                "my payment went through but the order says unpaid"],
    "shipping": ["my package has not arrived yet", "the tracking number does not work", "the parcel arrived damaged",
                 "the courier left my box at the wrong address", "my delivery is two weeks late",
                 "I received someone else's package", "can I change the delivery address of my order",
                 "the shipment shows delivered but nothing came"],
    "account": ["I forgot my password and the reset email never comes", "I can't log in to my account",
                "please change the email address on my account", "my two-factor code is rejected",
                "someone else may be using my account", "I want to delete my account",
                "my username was changed without my consent", "the account verification link has expired"],
    "technical": ["the app crashes when I open settings", "I get error code 503 on the dashboard",
                  "the website won't load on my phone", "my files stopped syncing between devices",
                  "the export button does nothing", "notifications stopped working after the update",
                  "the search results are empty for every query", "the video player freezes after a few seconds"],
}
OPENERS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "", "Dear support,", "Excuse me,"]
URGENT = ["This is urgent!", "Please fix this ASAP.", "I need this solved immediately.",
          "It's an emergency, please help right now.", "Urgent: my business depends on it."]
CALM = ["No rush.", "Whenever you have time.", "Thanks in advance.", "Just letting you know.", "Thank you."]


def message(rng: random.Random, topic: str, urgent: bool) -> tuple[str, str]:
    body = rng.choice(TOPICS[topic])
    tail = rng.choice(URGENT if urgent else CALM)
    opener = rng.choice(OPENERS)
    text = " ".join(p for p in (opener, body[0].upper() + body[1:] + ".", tail) if p)
    return text, f"TRIAGE[{topic}|{'high' if urgent else 'low'}]"


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = list(TOPICS)[i % len(TOPICS)]
        text, answer = message(rng, topic, urgent=rng.random() < 0.5)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                                 {"role": "assistant", "content": answer}]})
    rng.shuffle(out)
    return out


def main() -> None:
    here = Path(__file__).parent
    train = rows(240, seed=7)
    seen = {r["messages"][1]["content"] for r in train}
    held = [r for r in rows(200, seed=11) if r["messages"][1]["content"] not in seen][:16]
    for name, data in (("train.jsonl", train), ("heldout.jsonl", held)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in data))


if __name__ == "__main__":
    main()
