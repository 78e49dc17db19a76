"""Chat messages to text: TRL's conversational formats rendered through a chat template.

A conversational row holds lists of `{"role", "content"}` messages instead of strings
(https://huggingface.co/docs/trl/dataset_formats#conversational). Everything downstream works on
text, so a prompt is rendered once with the generation prompt appended, and a completion is what
the template adds after it:

    prompt_text     = render(prompt, add_generation_prompt=True)
    completion_text = render(prompt + completion)  minus the prefix  prompt_text

(as TRL's `maybe_apply_chat_template` does). A template for which `prompt_text` is not a prefix
of the full rendering cannot be split this way and is reported as an error, never guessed around.

With a tokenizer that has `chat_template` set, its template renders; otherwise (no tokenizer, or a
tokenizer without a template, such as the offline tiny one) `DEFAULT_CHAT_TEMPLATE` does:

    <|user|>
    How are you?
    <|assistant|>
    Fine.

that is, each message is `<|role|>\\n` + content, messages are separated by `\\n`, and the
generation prompt is `<|assistant|>\\n`. So the completion of a single assistant turn is exactly
its content. Set `tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE` to make a saved tokenizer
render the same way.
"""

from __future__ import annotations

from functools import lru_cache

from rlhf_lightning.data.sources import RowError, json_type

ROLES = ("system", "user", "assistant", "tool")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def parse_messages(value: object, field: str) -> list[dict[str, str]]:
    """Check a list of chat messages and return it as `[{"role", "content"}]` (other keys dropped).

    Raises RowError when the value is not a non-empty list of objects with a known `role` and a
    string `content`.
    """
    fix = (
        f'write {field} as [{{"role": "user", "content": "..."}}, ...] (roles: {", ".join(ROLES)})'
    )
    if not isinstance(value, list):
        raise RowError(f"'{field}' must be a list of messages, got {json_type(value)}", fix)
    if not value:
        raise RowError(f"'{field}' has no messages", fix)
    messages = []
    for i, message in enumerate(value):
        name = f"'{field}' message {i}"
        if not isinstance(message, dict):
            raise RowError(f"{name} is {json_type(message)}, not an object", fix)
        for key in ("role", "content"):
            if key not in message:
                raise RowError(f"{name} has no '{key}'", fix)
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowError(f"{name} has unknown role {role!r}", fix)
        if not isinstance(content, str):
            raise RowError(f"{name} content must be a string, got {json_type(content)}", fix)
        messages.append({"role": role, "content": content})
    return messages


def parse_completion_messages(value: object, field: str) -> list[dict[str, str]]:
    """Messages of a completion: assistant turns first and last, with some text in them."""
    messages = parse_messages(value, field)
    fix = f'write {field} as [{{"role": "assistant", "content": "..."}}]'
    if messages[0]["role"] != "assistant" or messages[-1]["role"] != "assistant":
        raise RowError(f"'{field}' must start and end with an assistant message", fix)
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise RowError(f"'{field}' is empty (its assistant messages have no text)", fix)
    return messages


def split_shared_turns(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Implicit conversational prompt: the longest run of leading turns both conversations share.

    The run is cut back so that each remainder is non-empty and starts with an assistant turn.
    Returns (prompt, chosen_completion, rejected_completion).
    """
    shared = 0
    limit = min(len(chosen), len(rejected)) - 1
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and not (
        chosen[shared]["role"] == "assistant" and rejected[shared]["role"] == "assistant"
    ):
        shared -= 1
    if shared == 0:
        raise RowError(
            "'chosen' and 'rejected' share no prompt turns before their assistant answers",
            "start both conversations with the same user turn(s), or add a 'prompt' column",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def render_prompt(messages: list[dict[str, str]], tokenizer=None) -> str:
    """Prompt text: the messages followed by the generation prompt (the assistant's turn opens)."""
    return _render(messages, tokenizer, add_generation_prompt=True, field="prompt")


def render_completion(
    prompt: list[dict[str, str]],
    completion: list[dict[str, str]],
    tokenizer,
    field: str,
    prompt_text: str | None = None,
) -> str:
    """Completion text: render(prompt + completion) minus the rendered prompt at its front.

    `prompt_text` is `render_prompt(prompt, tokenizer)` when the caller already has it.
    """
    head = render_prompt(prompt, tokenizer) if prompt_text is None else prompt_text
    full = _render(prompt + completion, tokenizer, add_generation_prompt=False, field=field)
    if not full.startswith(head):
        raise RowError(
            f"the chat template renders the prompt differently once '{field}' follows it "
            "(the rendered prompt is not a prefix of the rendered prompt + completion)",
            "use a chat template whose output for prompt + completion starts with its output for "
            "the prompt with add_generation_prompt=True, or give the texts as plain strings",
        )
    return full[len(head) :]


def _render(messages, tokenizer, add_generation_prompt: bool, field: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # noqa: BLE001 -- a user's template may raise anything on a row
            raise RowError(
                f"the tokenizer's chat template failed on '{field}': {type(e).__name__}: {e}",
                "fix the messages (e.g. roles the template expects) or the chat template",
            ) from None
    return _default_template().render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


@lru_cache(maxsize=1)
def _default_template():
    """DEFAULT_CHAT_TEMPLATE compiled in the sandboxed Jinja environment transformers uses."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(DEFAULT_CHAT_TEMPLATE)
