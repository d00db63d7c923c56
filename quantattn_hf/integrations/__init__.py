"""Integrations with Hugging Face libraries: diffusers (`.diffusers`: processors, apply/remove), transformers."""
