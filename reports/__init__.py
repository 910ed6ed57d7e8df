"""Result models (pydantic) and the writers that turn them into JSON, CSV, Markdown, HTML and plots."""
