"""Loading a causal LM and its tokenizer (Hub id, directory, GGUF file with its dequantized cache), its placement on
devices, and a one-line reason when it does not load.

May import: errors, files, compat, config.
"""
