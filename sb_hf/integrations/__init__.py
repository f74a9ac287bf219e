"""Glue between the pure-torch ops and Hugging Face Transformers."""
