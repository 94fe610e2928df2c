"""Row formats and parsing, sources (files and hub datasets), tokenisation and collation."""

from rlmf.data.collate import (
    DropCounts,
    FeedbackCollator,
    PairCollator,
    PromptCollator,
    describe_rendering,
    log_data_report,
    tokenize_feedback,
    tokenize_pairs,
    tokenize_prompts,
    uses_chat_template,
)
from rlmf.data.formats import (
    DataError,
    FeedbackExample,
    Message,
    PreferencePair,
    PromptOnly,
    messages_to_dicts,
    pairs_to_feedback,
    parse_feedback_row,
    parse_pair_row,
    parse_prompt_row,
    parse_transcript,
    render_messages,
)
from rlmf.data.sources import LoadReport, load_feedback, load_pairs, load_prompts, read_rows, write_jsonl
