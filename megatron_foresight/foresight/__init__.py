"""The foresight format (DESIGN.md section 2): its tags, and the parsers every other part calls.
No one outside this package looks for tags in model text."""
