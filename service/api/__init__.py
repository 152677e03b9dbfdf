"""One router per resource (STYLE.md 7)."""
