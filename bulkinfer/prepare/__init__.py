"""From input chunks to model input: prompts rendered (render.py), tokenized into spill files
(tokenize.py), held as PreparedRows (rows.py)."""

from bulkinfer.prepare.render import RenderOptions, appended_special_tokens, render_options
from bulkinfer.prepare.rows import ID_COLUMN, PreparedRows, prepared_location
from bulkinfer.prepare.tokenize import prepare_rows, untruncated_backend

__all__ = [
    "ID_COLUMN",
    "PreparedRows",
    "RenderOptions",
    "untruncated_backend",
    "appended_special_tokens",
    "prepare_rows",
    "prepared_location",
    "render_options",
]
