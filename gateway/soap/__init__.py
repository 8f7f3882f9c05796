"""soap package."""
