"""Run-dir → human summary (``render_text``) and the versioned JSON report (``report_document``).
Imports only the protocol."""

from .export import SCHEMA_ID, report_document
from .summary import RunSummary, render_text, summarize

__all__ = ["RunSummary", "SCHEMA_ID", "render_text", "report_document", "summarize"]
