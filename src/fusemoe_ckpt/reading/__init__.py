"""Reading a source: the safetensors header format, safe file opening, the checkpoint's index,
headers and config, and the side files copied beside the weights."""
