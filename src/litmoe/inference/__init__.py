"""After training: a checkpoint loaded for sampling, scoring and export to Hugging Face format."""
