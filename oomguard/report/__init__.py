"""Run-dir → human summary. Imports only the protocol (and rich to print)."""

from .summary import RunSummary, render_text, summarize

__all__ = ["RunSummary", "render_text", "summarize"]
