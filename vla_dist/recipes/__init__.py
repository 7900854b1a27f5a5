"""Post-training recipes compared against a baseline (`vla-dist recipes run/report`, docs/recipes.md)."""
