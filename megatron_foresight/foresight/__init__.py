"""The foresight format (README, "Two versions of the foresight format"): its tags, and the
parsers every other part calls. No one outside this package looks for tags in model text."""
