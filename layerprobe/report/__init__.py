"""Terminal tables, PNG figures and self-contained HTML pages."""
