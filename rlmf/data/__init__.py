"""Row formats and parsing, HH transcripts, sources (files and hub datasets), rendering, tokenisation and collation."""

from rlmf.data.collate import FeedbackCollator, PairCollator, PromptCollator
from rlmf.data.formats import (
    DataError,
    FeedbackExample,
    Message,
    PreferencePair,
    PromptOnly,
    messages_to_dicts,
    pairs_to_feedback,
)
from rlmf.data.parsing import parse_feedback_row, parse_pair_row, parse_prompt_row
from rlmf.data.rendering import describe_rendering, uses_chat_template
from rlmf.data.sources import LoadReport, load_feedback, load_pairs, load_prompts, read_rows, read_written, write_jsonl
from rlmf.data.tokenization import DropCounts, log_data_report, tokenize_feedback, tokenize_pairs, tokenize_prompts
from rlmf.data.transcripts import parse_transcript, render_messages
