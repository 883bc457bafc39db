"""Hugging Face interchange: export to transformers (GPT-2 or the self-contained megatron_moe model), import
of GPT-2-family directories, and the tokenizer files a transformers directory carries."""
