"""The Hugging Face Hub in and out. Only repo_id.py is imported by a local convert; the other
modules import huggingface_hub and are loaded when a command needs the Hub."""
