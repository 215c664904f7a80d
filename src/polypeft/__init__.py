"""polypeft: language-specific parameter-efficient modules for multilingual transformers."""
__version__ = "0.1.0"
