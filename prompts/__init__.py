"""Data files only: class names (classnames/) and prompt templates (templates/)."""
