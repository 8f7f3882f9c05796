"""xca package."""
