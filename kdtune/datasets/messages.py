"""Turning dataset rows into chat messages (``[{"role": ..., "content": ...}]``), checked.

Every format becomes a conversation rendered by the model's own chat template, so what the model
trains on has the format it is used with. An Alpaca row becomes one user turn (the instruction,
then a blank line and the input if there is one) and one assistant turn (the output).
"""

from kdtune.datasets.rows import field
from kdtune.errors import KDTuneError

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names and the roles they mean.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
STYLES = ("auto", "openai", "sharegpt")


def alpaca_messages(data: dict) -> list[dict]:
    instruction, extra = field(data, "instruction"), field(data, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": field(data, "output")}]


def chat_messages(data: dict, style: str = "auto") -> list[dict]:
    """Messages of an OpenAI-style ``messages`` row or a ShareGPT ``conversations`` row.

    ``style="auto"`` takes whichever of the two columns the row has.
    """
    if style == "auto":
        style = "sharegpt" if "conversations" in data and "messages" not in data else "openai"
    openai = style == "openai"
    column, role_key, text_key = ("messages", "role", "content") if openai else ("conversations", "from", "value")
    turns = data.get(column)
    if turns is None:
        raise KDTuneError(f"missing field '{column}' (present: {', '.join(map(str, data)) or 'none'})")
    if not isinstance(turns, list):
        raise KDTuneError(f"field '{column}' is not a list")
    if not turns:
        raise KDTuneError(f"field '{column}' is an empty conversation")
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise KDTuneError(f"message {i} of '{column}' is not an object")
        role = turn.get(role_key)
        role = role if openai else SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            raise KDTuneError(f"message {i} of '{column}' has unknown role {turn.get(role_key)!r}")
        try:
            content = field(turn, text_key)
        except KDTuneError as e:
            raise KDTuneError(f"message {i} of '{column}': {e}") from None
        messages.append({"role": role, "content": content})
    return messages
