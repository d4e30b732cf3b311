"""The chat-templated prompt around a video, split where the video tokens go.

The checkpoint's own chat template renders one placeholder for the video; we split the prompt there
instead of expanding the placeholder in text, so a prompt with 147 456 video tokens is never tokenized.
"""

from dataclasses import dataclass

VISION_START, VIDEO_PAD, VISION_END = "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END


@dataclass(frozen=True)
class PromptSegments:
    """Token ids before and after the video tokens.

    Args:
        text0_ids (list[int]): system prompt + user header + `<|vision_start|>`.
        text1_ids (list[int]): `<|vision_end|>` + question + assistant header.
    """

    text0_ids: list[int]
    text1_ids: list[int]


def build_prompt(tokenizer, question: str, system_prompt: str | None = None) -> PromptSegments:
    """Render `question` about one video with the checkpoint's chat template."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, found, after = text.partition(VIDEO_PLACEHOLDER)
    if not found:
        raise ValueError(f"the chat template did not render the video placeholder {VIDEO_PLACEHOLDER!r}")
    return PromptSegments(
        text0_ids=tokenizer.encode(before + VISION_START, add_special_tokens=False),
        text1_ids=tokenizer.encode(VISION_END + after, add_special_tokens=False),
    )
