"""File names of a Hugging Face model folder that every layer uses (data_prep, the model, a save_folder).

A module of its own, importing nothing, so that ``data_prep`` can name them without importing torch.
"""

TOKENIZER_FILE = "tokenizer.json"  # a fast tokenizer (tokenizers' JSON); also its name in a save_folder
