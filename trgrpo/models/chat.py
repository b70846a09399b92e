"""A user prompt, after earlier turns, as token ids under the model's chat template."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str, context: tuple[tuple[str, str], ...] = ()) -> list[int]:
    """Token ids of a user message, after earlier (user, assistant) turns, under the model's chat
    template (plain text, turns separated by blank lines, when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        turns = [
            {"role": role, "content": text}
            for user, assistant in context
            for role, text in (("user", user), ("assistant", assistant))
        ]
        text = tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer.encode(text, add_special_tokens=False)
    earlier = "".join(f"{user}\n{assistant}\n\n" for user, assistant in context)
    return tokenizer.encode(earlier + prompt, add_special_tokens=True)
