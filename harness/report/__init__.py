"""The HTML report: the page, its tables, its charts and its assets."""
