"""APT for Hugging Face transformers."""
