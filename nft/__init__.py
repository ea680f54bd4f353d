"""NFT study platform: Negative-aware Fine-Tuning vs GRPO, Dr.GRPO, DAPO and RFT on math reasoning."""

__version__ = "0.1.0"
