"""Bring your own data (``conf/task/preference_files.yaml``): preference pairs from JSONL / JSON / Parquet files or
``datasets`` hub ids (:func:`rlmf.data.load_pairs`). The file's pairs are the feedback: there is no feedback source
and no gold metric; SFT trains on the chosen completions, the discriminator on the pairs, the alignment round on the
pairs as they are, and the online algorithms on the training pairs' prompts."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

from rlmf.tasks.base import Task, register_task

log = logging.getLogger(__name__)


@register_task("preference_files")
class PreferenceFilesTask(Task):
    def __init__(self, cfg, seed: int):
        super().__init__(cfg, seed)
        self._pairs: Dict[str, List[Any]] = {}

    def preference_pairs(self, split: str) -> List[Any]:
        """Preference pairs of ``task.train`` (split "train"; its ``task.rows`` when set) or ``task.eval`` (split
        "eval"), bad rows per config. Without ``task.eval`` the last tenth of the training rows is held out."""
        if split not in self._pairs:
            t = self.cfg
            if split == "eval" and t.eval:
                rows = self._load(t.eval, t.eval_split)
            else:
                rows = self.rows(t.rows) if t.rows is not None else self._load(t.train, t.split)
                if not t.eval:
                    n_eval = max(1, len(rows) // 10)
                    rows = rows[-n_eval:] if split == "eval" else rows[:-n_eval]
            self._pairs[split] = rows
        return self._pairs[split]

    def rows(self, span) -> List[Any]:
        """The pairs of ``task.train`` in ``span`` = [start, stop) (:class:`~rlmf.data.DataError` if it has fewer)."""
        from rlmf.data import DataError

        pairs = self._load(self.cfg.train, self.cfg.split)
        start, stop = span
        if stop > len(pairs):
            raise DataError(f"{self.cfg.train}: rows [{start}, {stop}) asked for, but it has {len(pairs)} rows")
        return pairs[start:stop]

    def _load(self, source: str, split: str) -> List[Any]:
        from rlmf.data import load_pairs

        key = f"file:{source}:{split}"
        if key not in self._pairs:
            t = self.cfg
            self._pairs[key], report = load_pairs(source, split=split, subset=t.subset, on_bad_row=t.on_bad_row,
                                                  transcripts=t.transcripts)
            log.info("data: %s", report)
        return self._pairs[key]

    def corpus(self) -> List[str]:
        return [x for p in self.preference_pairs("train") for x in (p.prompt + p.chosen, p.prompt + p.rejected)]

    def demonstrations(self, split: str):
        """The chosen completions (with their messages, for a chat template) of the train or the eval pairs."""
        from rlmf.data import pairs_to_feedback

        pairs = self.preference_pairs("train" if split == "train" else "eval")
        return [f for f in pairs_to_feedback(pairs) if f.desirable]

    def train_prompts(self):
        from rlmf.data import PromptOnly

        return [PromptOnly(p.prompt, p.prompt_messages) for p in self.preference_pairs("train")]

    def eval_prompts(self):
        from rlmf.data import PromptOnly

        return [PromptOnly(p.prompt, p.prompt_messages) for p in self.preference_pairs("eval")[: self.cfg.eval_prompts]]
