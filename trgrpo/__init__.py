"""trgrpo: RL with verifiable rewards for language models, GRPO and Token-Regulated GRPO."""

__version__ = "0.1.0"
