"""The operators' side: `python -m worker …` (cli), dead-letter replay and publishing."""
