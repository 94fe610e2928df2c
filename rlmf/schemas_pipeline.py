"""The schemas of the pipeline's data and flow: the tasks, which stages run, rounds of feedback, how feedback becomes
pairs, what the evaluation adds, and where metrics go.

Each field is declared once, with its default and its help text (``metadata["help"]``); ``python -m rlmf.config``
and ``docs/config.md`` are rendered from them. What trains (generator, discriminator, algo, trainer) is in
:mod:`rlmf.schemas_training`; :mod:`rlmf.config` registers both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

STAGES = ("sft", "feedback", "discriminator", "align", "evaluate")


@dataclass
class PersonaEmailTaskConfig:
    """The embedded task: outreach emails to generated prospects, answered (or not) by a hidden recipient simulator
    (:mod:`rlmf.tasks.persona_email`)."""

    name: str = field(default="persona_email", metadata={"help": "The task's name in rlmf.tasks (set by its yaml)."})
    num_prospects: int = field(default=360, metadata={
        "help": "Prospect briefs in the generated world (at least 10), split into train, validation and held-out."})
    emails_per_prospect: int = field(default=4, metadata={
        "help": "Demonstration emails written per train and validation brief: the SFT data."})
    heldout_persona_fraction: float = field(default=0.2, metadata={
        "help": "Fraction of the personas (role x industry x size), and of the briefs, kept for the held-out split: "
                "the evaluation's briefs come from personas training never sees."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Fraction of the other briefs kept for validation."})
    demo_quality: float = field(default=0.35, metadata={
        "help": "Chance, in [0, 1], that each part of a demonstration email is written for the persona; otherwise "
                "the part is drawn at random, poor options included."})
    eval_prompts: int = field(default=48, metadata={"help": "Held-out briefs the evaluation samples emails for."})
    eval_samples_per_prompt: int = field(default=2, metadata={"help": "Emails sampled per evaluation brief."})
    feedback_prompts: int = field(default=256, metadata={
        "help": "Feedback stage: training briefs whose sampled emails go to the simulated recipients."})
    feedback_samples_per_prompt: int = field(default=4, metadata={
        "help": "Feedback stage: emails sampled per brief; each replied email is paired with an unanswered one of the "
                "same brief."})
    align_prompts: int = field(default=192, metadata={
        "help": "Align stage: training briefs the generator samples for in each round of machine feedback."})
    align_samples_per_prompt: int = field(default=4, metadata={
        "help": "Align stage: emails (k) sampled per brief, ranked by the reward."})


@dataclass
class PreferenceFilesTaskConfig:
    """Bring your own data: JSONL / JSON / Parquet files or ``datasets`` hub ids."""

    name: str = field(default="preference_files", metadata={"help": "The task's name in rlmf.tasks (set by its yaml)."})
    train: str = field(default=MISSING, metadata={
        "help": "Required: the training pairs, a local .jsonl / .json / .parquet file or a datasets hub id."})
    eval: Optional[str] = field(default=None, metadata={
        "help": "Held-out pairs, from the same kinds of source. null: the last tenth of the training rows."})
    split: str = field(default="train", metadata={"help": "Hub datasets: the split task.train reads."})
    eval_split: str = field(default="test", metadata={"help": "Hub datasets: the split task.eval reads."})
    subset: Optional[str] = field(default=None, metadata={
        "help": "Hub datasets: the dataset's config name. null: its default one."})
    on_bad_row: str = field(default="error", metadata={
        "help": "error: a malformed row stops the run, naming its file, line and field | skip: such rows are left out "
                "and counted in the data report."})
    eval_prompts: int = field(default=32, metadata={
        "help": "Held-out prompts the evaluation samples (those of the first eval pairs)."})
    eval_samples_per_prompt: int = field(default=1, metadata={"help": "Completions sampled per evaluation prompt."})
    transcripts: str = field(default="chat", metadata={
        "help": "HH-RLHF transcripts (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"). chat: their turns become messages, "
                "rendered with the tokenizer's chat template when it has one (as text otherwise) | raw: the transcript "
                "text as it is."})
    rows: Optional[List[int]] = field(default=None, metadata={
        "help": "[start, stop) of task.train's rows (0-based, as a Python slice); without task.eval the held-out tenth "
                "is taken from these. Splits one file between uses, e.g. rows for a judge (evaluate.judge_rows). "
                "null: every row."})


@dataclass
class LoggerConfig:
    """Where metrics go; summary.json and train.log are written whatever the logger."""

    kind: str = field(default="wandb", metadata={
        "help": "wandb | csv (<run_dir>/logs/<stage>/metrics.csv) | none."})
    project: str = field(default="rlmf", metadata={"help": "W&B project."})
    mode: str = field(default="offline", metadata={
        "help": "W&B mode (offline: sync later with `wandb sync`), used unless WANDB_MODE is set."})
    save_dir: str = field(default=".", metadata={"help": "W&B writes its wandb/ folder under this directory."})


@dataclass
class StageConfig:
    """Which stages run, and where finished stages are taken from."""

    stages: List[str] = field(default_factory=lambda: list(STAGES), metadata={
        "help": "Stages to run, from sft, feedback, discriminator, align, evaluate (always in that order); the "
                "others are taken finished from this run directory or stage.from_run."})
    from_run: Optional[str] = field(default=None, metadata={
        "help": "An earlier run directory whose finished stages (those with a done.json) are reused."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Where the jobs of a sweep share their sft, feedback and discriminator stages and the align stage's "
                "round of machine feedback, each under a key of the config it reads (rlmf.stage_cache.stage_key), "
                "computed once under a lock. A relative path is taken inside the directory holding the job's (the "
                "sweep directory). Single-process jobs only. null: off."})


@dataclass
class LoopConfig:
    """Rounds of machine feedback (:func:`rlmf.pipeline.run_pipeline`): round r > 1 repeats feedback ->
    discriminator -> align from round r-1's aligned generator. To compare N rounds with one at the same number of
    answered completions, divide the task's feedback budget by N (e.g. ``task.feedback_prompts``)."""

    rounds: int = field(default=1, metadata={
        "help": "Rounds of feedback -> discriminator -> align; a task with a feedback source is needed for more "
                "than one."})
    discriminator: str = field(default="warm", metadata={
        "help": "warm: each round's discriminator continues from the previous round's | scratch: trained anew."})
    allocation: str = field(default="uniform", metadata={
        "help": "How the feedback stage's A/B tests (rlmf.feedback.bandit) share a prompt's sends among its "
                "candidates: uniform | thompson (Thompson sampling)."})
    sends_per_prompt: Optional[int] = field(default=None, metadata={
        "help": "Recipients per prompt in those A/B tests. null: one per candidate (the classic single-send test)."})
    weighting: str = field(default="none", metadata={
        "help": "Weight of each feedback pair: none (1 each) | posterior (the posterior probability that the chosen's "
                "reply rate is above the rejected's)."})


@dataclass
class FeedbackConfig:
    """How the align stage's round of machine feedback becomes pairs
    (:func:`rlmf.stages.align_feedback.machine_feedback`)."""

    pairs: str = field(default="best_worst", metadata={
        "help": "best_worst: the reward's best sample (or the one at chosen_rank) against its worst | clair: a "
                "minimal revision against the sample it revises | ab: the feedback stage's A/B pairs as they are "
                "(replied vs ignored, no reward model in between)."})
    reviser: str = field(default="guided", metadata={
        "help": "pairs=clair: guided (one-line edits guided by the reward) | llm (a causal LM asked to revise)."})
    reviser_path: Optional[str] = field(default=None, metadata={
        "help": "reviser=llm: the reviser's checkpoint. null: the generator itself."})
    chosen_rank: int = field(default=1, metadata={
        "help": "pairs=best_worst: the chosen is the sample ranked this of k (1: the best; k-1: the second-worst, a "
                "chosen below the model's typical sample, as in APO's 'worse chosen' condition); the rejected is "
                "always the worst."})
    drop_desirable: float = field(default=0.0, metadata={
        "help": "Fraction of the round's desirable examples (thumbs-up rows, and the pairs whose chosen they are) "
                "left out at random: KTO's data-imbalance experiment (Ethayarajh et al. 2024). In [0, 1)."})


@dataclass
class EvaluateConfig:
    """Extra measurements of the evaluate stage (:func:`rlmf.stages.evaluate.stage_evaluate`); the held-out prompts and
    samples per prompt are the task's (``task.eval_prompts``, ``task.eval_samples_per_prompt``)."""

    best_of_n: List[int] = field(default_factory=list, metadata={
        "help": "Best-of-n sampling from the SFT model with the discriminator picking: the gold reply rate, the proxy "
                "reward and the analytic KL log n - (n - 1) / n for each n listed (e.g. [1, 2, 4, 8, 16]; Gao et al. "
                "2023). Empty: not measured."})
    judge: Optional[str] = field(default=None, metadata={
        "help": "A saved discriminator (its model directory) that scores the held-out samples in place of the run's "
                "own: an independent judge, so a policy is not graded by the proxy it optimised. null: the run's "
                "discriminator, if any."})
    judge_rows: Optional[List[int]] = field(default=None, metadata={
        "help": "Or train that judge here (task=preference_files): a discriminator, as discriminator= configures, on "
                "these [start, stop) rows of task.train, which the policy and its reward model never see. Shared by "
                "the jobs of a sweep (stage.cache_dir) and trained with judge_seed, so every arm and seed is graded "
                "by the same judge."})
    judge_seed: int = field(default=0, metadata={"help": "Seed of that judge's training, whatever the job's seed."})
    judge_max_epochs: Optional[int] = field(default=None, metadata={
        "help": "Passes of that judge over its rows; null: discriminator.max_epochs. Its held-out accuracy is "
                "measured on all of the task's own pairs (task.rows), which it never sees."})
