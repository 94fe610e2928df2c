"""The embedded task: write the outreach email that gets a reply from this kind of prospect.

A small, seeded world the project generates itself (no torch, no files):

* ``Prospect``: a persona (role, industry, company size, pain point) with a name and a company; ``Product``: what is
  being sold. A prompt is a prospect + product brief; a completion is a short email (greeting, hook, value line,
  call to action, sign-off) drawn from a phrase grammar.
* :class:`RecipientSimulator` is the hidden ground truth: it reads an email's *text* and returns the persona's gold
  reply probability. It is for evaluation and for drawing simulated replies; no model trains on it directly.
* :func:`build_world` makes the demonstration corpus of mixed quality and the train / validation / held-out-persona
  splits. Held-out personas are (role, industry, size) combinations never seen in training.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

# --- the world's vocabulary -------------------------------------------------------------------------------------

# Each role cares most about one value family (the claim that moves them), and has a few quirks.
ROLES: Dict[str, str] = {
    "CTO": "security",
    "VP Marketing": "growth",
    "CFO": "cost",
    "COO": "time",
    "HR Director": "people",
    "Head of Sales": "growth",
}
INDUSTRIES = ("fintech", "healthcare", "retail", "logistics", "education", "manufacturing")
SIZES = ("startup", "mid-market", "enterprise")
SIZE_TEXT = {"startup": "20 employees", "mid-market": "400 employees", "enterprise": "9,000 employees"}
PAIN_POINTS: Dict[str, Tuple[str, ...]] = {
    "security": ("audit prep that takes weeks", "a recent phishing scare", "scattered access controls"),
    "growth": ("a flat sales pipeline", "low trial conversion", "rising ad costs"),
    "cost": ("cloud bills growing every quarter", "too many overlapping tools", "a tight budget this year"),
    "time": ("manual weekly reporting", "slow order handoffs", "too many status meetings"),
    "people": ("slow onboarding", "high first-year attrition", "hiring for ten open roles"),
}
FIRST_NAMES = ("Dana", "Priya", "Marcus", "Elena", "Tomas", "Aisha", "Kenji", "Laura", "Omar", "Sofia", "Ravi",
               "Chloe", "Mateo", "Ingrid", "Femi", "Yuki")
LAST_NAMES = ("Kim", "Patel", "Okafor", "Rossi", "Novak", "Haddad", "Sato", "Berg", "Silva", "Moreau", "Chen", "Ali")
COMPANY_PARTS = (("Nex", "Vel", "Quant", "Blue", "Arc", "Luma", "Terra", "Kin", "Sol", "Brio"),
                 ("ora", "ify", "ware", "line", "stack", "loop", "grid", "path", "works", "hub"))
PRODUCTS = ("VaultLine", "Brightlane", "Ledgerly", "Flowdesk", "Teamwell", "Signalry")
SENDERS = ("Alex", "Jordan", "Sam", "Riley")

# --- the email grammar -------------------------------------------------------------------------------------------

GREETINGS = ("Hi {first},", "Hello {first},", "Dear {first} {last},", "Hi there,", "To whom it may concern,",
             "Hey friend!!")
HOOKS = (
    "I noticed {company} is dealing with {pain}.",
    "Teams in {industry} keep telling us about {pain}.",
    "Congrats on the growth at {company}.",
    "I hope this email finds you well.",
    "This is the opportunity of a lifetime!!!",
)
CLAIMS: Dict[str, Tuple[str, ...]] = {
    "security": ("{product} keeps customer data encrypted and audit-ready for SOC 2.",
                 "{product} cut security incidents by 40% at similar {industry} firms."),
    "growth": ("{product} helped similar teams grow qualified pipeline by 30%.",
               "{product} lifts trial conversion by 18% within a quarter."),
    "cost": ("{product} trims software spend by 25% without new headcount.",
             "{product} pays for itself in under six months."),
    "time": ("{product} saves each manager about 5 hours a week by automating reports.",
             "{product} cuts order handoff time in half."),
    "people": ("{product} halves onboarding time and keeps new hires engaged.",
               "{product} lowered first-year attrition by 20% for similar teams."),
    "generic": ("{product} is the best solution on the market.",
                "{product} is a revolutionary platform for everything."),
}
FILLERS = ("We have been in business for many years.", "Our team is passionate about innovation.",
           "We work with many companies of all sizes.", "Our platform has many features you will love.")
SPAM_LINES = ("FREE trial, guaranteed results, act now!", "Limited offer: 50% off if you sign today!!!")
CALLS_TO_ACTION = ("Would a 15-minute call next Tuesday be useful?", "Can I send over a short case study?",
                   "Are you free for a quick chat this week?", "Let me know.",
                   "Reply now to claim your discount!!!")
SIGN_OFFS = ("Best,\n{sender}", "Thanks,\n{sender}", "Cheers,\n{sender}", "")

# Text markers the simulator reads. They are derived from the grammar so they cannot drift from it.
CLAIM_MARKERS: Dict[str, Tuple[str, ...]] = {
    "security": ("encrypted", "SOC 2", "security incidents"),
    "growth": ("pipeline", "conversion"),
    "cost": ("spend", "pays for itself"),
    "time": ("hours a week", "handoff time"),
    "people": ("onboarding", "attrition"),
    "generic": ("best solution", "revolutionary"),
}
SPAM_MARKERS = ("!!", "FREE", "guaranteed", "act now", "Limited offer", "opportunity of a lifetime")
SPECIFIC_ASKS = ("15-minute call", "case study", "quick chat")
PROMPT_SUFFIX = "Email:\n"


@dataclass(frozen=True)
class Prospect:
    first: str
    last: str
    company: str
    role: str
    industry: str
    size: str
    pain: str

    @property
    def persona(self) -> Tuple[str, str, str]:
        """The persona: what the simulator's preferences depend on (names and company do not)."""
        return (self.role, self.industry, self.size)


@dataclass(frozen=True)
class Brief:
    """One prompt: a prospect and the product to sell them."""

    prospect: Prospect
    product: str

    @property
    def prompt(self) -> str:
        p = self.prospect
        return (f"To: {p.first} {p.last}, {p.role} at {p.company} ({p.industry}, {SIZE_TEXT[p.size]})\n"
                f"Pain point: {p.pain}\nProduct: {self.product}\n{PROMPT_SUFFIX}")


@dataclass
class World:
    """The generated task: briefs per split and the SFT demonstrations (prompt, completion)."""

    train: List[Brief]
    validation: List[Brief]
    heldout: List[Brief]
    demonstrations: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict)
    simulator: "RecipientSimulator" = None

    def brief_for(self, prompt: str) -> Brief:
        return self._by_prompt[prompt]

    def __post_init__(self) -> None:
        self._by_prompt = {b.prompt: b for b in self.train + self.validation + self.heldout}


# --- the hidden recipient simulator ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipientSimulator:
    """Gold reply probability of an email for a prospect: ``sigmoid(logit)`` with a hand-set logit.

    Everyone rewards their name in the greeting, a hook about their own pain point, a concrete ask, and a sign-off;
    everyone punishes spam words and length. Each role's own value family (``ROLES``) moves them most (a CTO wants
    short, specific, security-minded emails; a VP Marketing wants growth numbers). Enterprises dislike casual or
    impersonal greetings. ``reply_probability`` reads the text only, so it scores any model's output.
    """

    base: float = -2.6
    name_bonus: float = 0.7
    pain_bonus: float = 0.9
    company_bonus: float = 0.2
    preferred_claim_bonus: float = 1.6
    other_claim_bonus: float = 0.2
    generic_claim_penalty: float = 0.4
    specific_ask_bonus: float = 0.6
    spam_penalty: float = 1.8
    sign_off_bonus: float = 0.3
    words_free: int = 45
    penalty_per_extra_word: float = 0.04
    cto_extra_penalty_per_word: float = 0.04

    def logit(self, prospect: Prospect, email: str) -> float:
        lines = [line.strip() for line in email.strip().splitlines() if line.strip()]
        if not lines:
            return self.base - 4.0
        first_line = lines[0]
        z = self.base
        if prospect.first in first_line and first_line.endswith(","):
            z += self.name_bonus
        elif prospect.size == "enterprise" and first_line in ("Hi there,", "Hey friend!!", "To whom it may concern,"):
            z -= 0.5
        if prospect.pain in email:
            z += self.pain_bonus
        if prospect.company in email:
            z += self.company_bonus
        families = {f for f, markers in CLAIM_MARKERS.items() if any(m in email for m in markers)}
        preferred = ROLES[prospect.role]
        if preferred in families:
            z += self.preferred_claim_bonus
        z += self.other_claim_bonus * len(families - {preferred, "generic"})
        if "generic" in families:
            z -= self.generic_claim_penalty
        if "?" in email and any(ask in email for ask in SPECIFIC_ASKS):
            z += self.specific_ask_bonus
        if any(marker in email for marker in SPAM_MARKERS):
            z -= self.spam_penalty
        if any(email.rstrip().endswith(sender) for sender in SENDERS):
            z += self.sign_off_bonus
        extra_words = max(0, len(email.split()) - self.words_free)
        per_word = self.penalty_per_extra_word + (self.cto_extra_penalty_per_word if prospect.role == "CTO" else 0)
        z -= per_word * extra_words
        return z

    def reply_probability(self, prospect: Prospect, email: str) -> float:
        return 1.0 / (1.0 + math.exp(-self.logit(prospect, email)))

    def draw_reply(self, prospect: Prospect, email: str, rng: random.Random) -> bool:
        """A simulated reply: True with the gold probability. What the discriminator is allowed to see."""
        return rng.random() < self.reply_probability(prospect, email)


# --- generating the world ----------------------------------------------------------------------------------------

def compose_email(brief: Brief, rng: random.Random, quality: float = 0.0, sender: str | None = None) -> str:
    """Draw one email from the grammar.

    ``quality`` in [0, 1] is the chance that each part is chosen with the persona in mind (name greeting, pain hook,
    the role's value claim, a concrete ask, no filler); otherwise each part is drawn uniformly, bad options included.
    """
    p, product = brief.prospect, brief.product
    fields = dict(first=p.first, last=p.last, company=p.company, industry=p.industry, pain=p.pain, product=product,
                  sender=sender or rng.choice(SENDERS))

    def pick(good: Sequence[str], every: Sequence[str]) -> str:
        return rng.choice(good) if rng.random() < quality else rng.choice(every)

    family = ROLES[p.role] if rng.random() < quality else rng.choice(sorted(CLAIMS))
    parts = [
        pick(GREETINGS[:3], GREETINGS),
        pick(HOOKS[:2], HOOKS),
        rng.choice(CLAIMS[family]),
    ]
    n_filler = 0 if rng.random() < quality else rng.choice((0, 0, 1, 2, 3))
    parts += rng.sample(FILLERS, n_filler)
    if rng.random() >= quality and rng.random() < 0.25:
        parts.append(rng.choice(SPAM_LINES))
    parts.append(pick(CALLS_TO_ACTION[:3], CALLS_TO_ACTION))
    sign_off = pick(SIGN_OFFS[:3], SIGN_OFFS)
    if sign_off:
        parts.append(sign_off)
    return "\n".join(part.format(**fields) for part in parts)


def _company_names(rng: random.Random) -> List[str]:
    names = [a + b for a in COMPANY_PARTS[0] for b in COMPANY_PARTS[1]]
    rng.shuffle(names)
    return names


def build_world(
    seed: int = 0,
    num_prospects: int = 360,
    emails_per_prospect: int = 4,
    heldout_persona_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    demo_quality: float = 0.35,
) -> World:
    """Generate the task deterministically from ``seed``.

    Personas (role x industry x size) are split first: ``heldout_persona_fraction`` of them appear only in the
    held-out split. The remaining prospects are split into train and validation briefs. Each train and validation
    brief gets ``emails_per_prospect`` demonstrations of mixed quality (``demo_quality``).
    """
    if num_prospects < 10:
        raise ValueError(f"task.num_prospects must be at least 10, got {num_prospects}")
    rng = random.Random(seed)
    personas = [(r, i, s) for r in sorted(ROLES) for i in INDUSTRIES for s in SIZES]
    rng.shuffle(personas)
    n_heldout = max(1, round(heldout_persona_fraction * len(personas)))
    heldout_personas, seen_personas = personas[:n_heldout], personas[n_heldout:]
    companies = _company_names(rng)

    def make_brief(index: int, persona: Tuple[str, str, str]) -> Brief:
        role, industry, size = persona
        prospect = Prospect(first=rng.choice(FIRST_NAMES), last=rng.choice(LAST_NAMES),
                            company=companies[index % len(companies)], role=role, industry=industry, size=size,
                            pain=rng.choice(PAIN_POINTS[ROLES[role]]))
        return Brief(prospect, rng.choice(PRODUCTS))

    n_heldout_briefs = max(1, round(num_prospects * heldout_persona_fraction))
    n_seen = num_prospects - n_heldout_briefs
    seen = [make_brief(i, seen_personas[i % len(seen_personas)]) for i in range(n_seen)]
    heldout = [make_brief(n_seen + i, heldout_personas[i % len(heldout_personas)]) for i in range(n_heldout_briefs)]
    rng.shuffle(seen)
    n_val = max(1, round(validation_fraction * n_seen))
    validation, train = seen[:n_val], seen[n_val:]

    demonstrations = {
        split: [(b.prompt, compose_email(b, rng, demo_quality)) for b in briefs for _ in range(emails_per_prospect)]
        for split, briefs in (("train", train), ("validation", validation))
    }
    return World(train=train, validation=validation, heldout=heldout, demonstrations=demonstrations,
                 simulator=RecipientSimulator())


def corpus_texts(world: World) -> List[str]:
    """Every prompt and demonstration, for training a tokenizer on the task's own text."""
    texts = [b.prompt for b in world.train + world.validation + world.heldout]
    texts += [prompt + email for split in world.demonstrations.values() for prompt, email in split]
    return texts


# --- the task the pipeline sees ----------------------------------------------------------------------------------

from rlmf.tasks.base import Task, register_task  # noqa: E402  (the world above needs none of the pipeline)


@register_task("persona_email")
class PersonaEmailTask(Task):
    """The embedded task (``conf/task/persona_email.yaml``): briefs from :func:`build_world` at the configured sizes,
    SFT on the world's demonstrations, simulated recipients as the feedback source, the simulator's reply
    probability as the gold metric, the persona (role, industry, size) as the group."""

    has_feedback = True
    has_gold = True
    metric_name = "reply_rate"

    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self.world = build_world(seed=seed, num_prospects=cfg.num_prospects,
                                 emails_per_prospect=cfg.emails_per_prospect,
                                 heldout_persona_fraction=cfg.heldout_persona_fraction,
                                 validation_fraction=cfg.validation_fraction, demo_quality=cfg.demo_quality)

    def corpus(self) -> List[str]:
        return corpus_texts(self.world)

    def demonstrations(self, split: str):
        return self.world.demonstrations[split]

    def train_prompts(self):
        from rlmf.data.formats import PromptOnly

        return [PromptOnly(b.prompt) for b in self.world.train[: self.cfg.align_prompts]]

    def eval_prompts(self):
        from rlmf.data.formats import PromptOnly

        return [PromptOnly(b.prompt) for b in self.world.heldout[: self.cfg.eval_prompts]]

    def feedback_prompts(self):
        from rlmf.data.formats import PromptOnly

        return [PromptOnly(b.prompt) for b in self.world.train[: self.cfg.feedback_prompts]]

    def feedback(self, prompts, completions, rng):
        """Each recipient replies (or not) with its gold probability: one Bernoulli draw per email."""
        return [self.world.simulator.draw_reply(self.world.brief_for(p).prospect, c, rng)
                for p, c in zip(prompts, completions)]

    def gold(self, prompts, completions):
        return [self.world.simulator.reply_probability(self.world.brief_for(p).prospect, c)
                for p, c in zip(prompts, completions)]

    def group(self, prompt: str) -> str:
        return " / ".join(self.world.brief_for(prompt).prospect.persona)

    def reward_context(self):
        return {"world": self.world}
