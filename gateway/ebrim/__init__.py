"""ebrim package."""
