"""Prompt templates: instruction formats and the tuning-free prompting styles of the survey.

A template is a string with one or more ``{text}`` slots (and, for instruction templates, one
``{instruction}`` slot). Rendering returns the full string and the character span of every copy of the
text, so the tokenizer's offset mapping can say exactly which tokens are text and which are prompt.
Substitution is literal (no ``str.format``): braces in texts or instructions are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT = "{text}"
INSTRUCTION = "{instruction}"


@dataclass(frozen=True)
class PromptStyle:
    """A text template and what the method pools.

    template: contains ``{text}`` once, or twice for Echo.
    pooling: the pooling the method prescribes (None: the model's own).
    add_eos: whether the method appends EOS after the template (None: the model's default). Prompting methods
        (PromptEOL and its variants) read the state that predicts the next word, so they must not.
    pool_copy: which ``{text}`` copy the pooled region starts at (Echo pools the second copy).
    include_prompt: pool the prompt tokens before that copy too (None: the model's default).
    instruction_template: how an instruction is combined with the text (``{instruction}`` and ``{text}``).
    """

    name: str
    template: str = TEXT
    pooling: str | None = None
    add_eos: bool | None = None
    pool_copy: int = 0
    include_prompt: bool | None = None
    instruction_template: str | None = None


E5_INSTRUCTION = "Instruct: {instruction}\nQuery: {text}"  # e5-mistral, gte-Qwen2, NV-Embed style
QWEN3_INSTRUCTION = "Instruct: {instruction}\nQuery:{text}"  # Qwen3-Embedding
_EOL_TAIL = ' this sentence : "{text}" means in one word:"'

PROMPT_STYLES: dict[str, PromptStyle] = {
    s.name: s
    for s in (
        PromptStyle("none"),
        PromptStyle("instruct", instruction_template=E5_INSTRUCTION),
        PromptStyle("qwen3", instruction_template=QWEN3_INSTRUCTION),
        # PromptEOL (Jiang et al. 2023) and the two variants of Zhang et al. 2024 (Pretended CoT,
        # Knowledge Enhancement): the last token's state, no EOS.
        PromptStyle(
            "prompteol", 'This sentence : "{text}" means in one word:"', pooling="last", add_eos=False
        ),
        PromptStyle("pcot", "After thinking step by step ," + _EOL_TAIL, pooling="last", add_eos=False),
        PromptStyle(
            "ke",
            "The essence of a sentence is often captured by its main subjects and actions, while "
            "descriptive terms provide additional but less central details. With this in mind ," + _EOL_TAIL,
            pooling="last",
            add_eos=False,
        ),
        # Echo embeddings (Springer et al. 2024): the text twice, mean over the second copy only.
        PromptStyle(
            "echo",
            "Rewrite the sentence: {text}\nRewritten sentence: {text}",
            pooling="mean",
            add_eos=False,
            pool_copy=1,
            include_prompt=False,
        ),
    )
}


def get_style(style) -> PromptStyle:
    """A :class:`PromptStyle` from a name, a template string (with ``{text}``) or a PromptStyle."""
    if style is None:
        return PROMPT_STYLES["none"]
    if isinstance(style, PromptStyle):
        check_template(style.template, "prompt_style.template")
        copies = style.template.count(TEXT)
        pc = style.pool_copy
        if isinstance(pc, bool) or not isinstance(pc, int) or not 0 <= pc < copies:
            raise ValueError(f"prompt_style.pool_copy must be an integer in [0, {copies}) (its template has "
                             f"{copies} '{{text}}' slot(s)), got {pc!r}")
        for field in ("add_eos", "include_prompt"):
            if getattr(style, field) is not None and not isinstance(getattr(style, field), bool):
                raise TypeError(f"prompt_style.{field} must be True, False or None, "
                                f"got {getattr(style, field)!r}")
        if style.instruction_template is not None:
            check_template(style.instruction_template, "prompt_style.instruction_template", instruction=True)
        return style
    if not isinstance(style, str):
        raise TypeError(
            f"prompt_style must be a name, a template string or a PromptStyle, got {type(style).__name__}"
        )
    if style in PROMPT_STYLES:
        return PROMPT_STYLES[style]
    if TEXT in style:
        return PromptStyle("custom", template=style)
    raise ValueError(
        f"prompt_style must be one of {sorted(PROMPT_STYLES)} or a template containing '{{text}}', "
        f"got {style!r}"
    )


def check_template(template, name: str, *, instruction: bool = False) -> str:
    if not isinstance(template, str):
        raise TypeError(f"{name} must be a string, got {type(template).__name__}")
    if TEXT not in template:
        raise ValueError(f"{name} must contain '{{text}}', got {template!r}")
    if instruction and INSTRUCTION not in template:
        raise ValueError(f"{name} must contain '{{instruction}}', got {template!r}")
    return template


def compose(template: str, instruction: str | None, instruction_template: str | None) -> str:
    """The template with the instruction applied: ``instruction_template`` with its ``{text}`` replaced by
    ``template`` (an instruction given without a template is prefixed as e5-mistral does)."""
    if instruction is None:
        return template
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string or None, got {type(instruction).__name__}")
    if TEXT in instruction:
        raise ValueError("instruction must not contain the literal '{text}' (it would become a text slot)")
    outer = instruction_template or E5_INSTRUCTION
    # the instruction first: a literal '{instruction}' in the inner template (a prompt) stays as it is
    return outer.replace(INSTRUCTION, instruction).replace(TEXT, template, 1)


def render(template: str, text: str) -> tuple[str, list[tuple[int, int]]]:
    """Fill every ``{text}`` slot with ``text``. Returns (string, [(char_start, char_end) per copy])."""
    pieces = template.split(TEXT)
    out, spans, pos = [], [], 0
    for i, piece in enumerate(pieces):
        out.append(piece)
        pos += len(piece)
        if i + 1 < len(pieces):
            spans.append((pos, pos + len(text)))
            out.append(text)
            pos += len(text)
    return "".join(out), spans
